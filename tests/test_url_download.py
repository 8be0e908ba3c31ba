"""URL downloads (load_image, which caption.py and the pipeline use) end at a total deadline."""

from __future__ import annotations

import http.server
import io
import threading
import time
from collections.abc import Iterator

import pytest
from PIL import Image

from show_attend_tell.image_processing_show_attend_tell import ImageLoadError, load_image

#: The most bytes a trickling answer sends (one per TRICKLE_GAP_S): it stops by itself after about 10 s.
TRICKLE_BYTES = 200
TRICKLE_GAP_S = 0.05


def picture_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


class SlowHandler(http.server.BaseHTTPRequestHandler):
    """/picture: a PNG at once; /trickle-body and /trickle-headers: one byte every TRICKLE_GAP_S seconds."""

    def do_GET(self) -> None:
        data = picture_bytes()
        try:
            if self.path == "/picture":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            elif self.path == "/trickle-body":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.trickle(data)
            elif self.path == "/trickle-headers":
                self.trickle(b"HTTP/1.1 200 OK\r\nX-Padding: " + b"x" * TRICKLE_BYTES)
            else:
                self.send_error(404)
        except OSError:
            pass  # the client gave up: what the tests want

    def trickle(self, data: bytes) -> None:
        for byte in data[:TRICKLE_BYTES]:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(TRICKLE_GAP_S)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def slow_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_url_downloads(slow_server):
    image = load_image(f"{slow_server}/picture", timeout=5)
    assert image.size == (40, 30) and image.getpixel((0, 0)) == (200, 30, 30)


@pytest.mark.parametrize("path", ["/trickle-body", "/trickle-headers"])
def test_a_trickling_download_stops_at_the_total_deadline(slow_server, path):
    # Each byte arrives well within any per-read timeout; only a total deadline stops the download early.
    started = time.monotonic()
    with pytest.raises(ImageLoadError, match=r"download took longer than 1 s in all"):
        load_image(f"{slow_server}{path}", timeout=1)
    # The whole trickle would take TRICKLE_BYTES * TRICKLE_GAP_S = 10 s; the deadline ends it after 1 s.
    assert time.monotonic() - started < 5
