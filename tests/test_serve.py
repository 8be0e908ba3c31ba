"""The HTTP service (show_attend_tell.serve), called over 127.0.0.1 as a client would."""

from __future__ import annotations

import concurrent.futures
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image
from serve_tiny_model import save_tiny_model, trained_tiny_captioner

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from show_attend_tell.serve import (  # noqa: E402 - after the optional-dependency checks
    BatchingCaptioner,
    Captioner,
    CaptionOptions,
    create_app,
)

# Every test needs the trained model (a few seconds of training, once per session).
pytestmark = pytest.mark.slow

TIMEOUT = httpx.Timeout(60.0)


@contextmanager
def running(app) -> Iterator[str]:
    """Serves `app` with uvicorn on 127.0.0.1 and a free port in a thread; yields the base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def png_bytes(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def captioner() -> Captioner:
    tiny = trained_tiny_captioner()
    return Captioner(tiny.model, tiny.processor)


@pytest.fixture(scope="module")
def test_images() -> list[Image.Image]:
    test = trained_tiny_captioner().dataset["test"]
    return [test[i]["image"].convert("RGB") for i in range(12)]


@pytest.fixture(scope="module")
def server(captioner) -> Iterator[str]:
    app = create_app(captioner, max_upload_bytes=200_000, max_image_pixels=1_000_000, max_wait_ms=5)
    with running(app) as url:
        yield url


def alone(captioner: Captioner, image: Image.Image, **options) -> dict:
    """What one image alone gives, without HTTP or batching: the reference for every answer."""
    (result,) = captioner.caption_batch([image], CaptionOptions(**options))
    return {"caption": result.caption, "tokens": result.tokens, "attention": result.attention}


def test_health(server, captioner):
    body = httpx.get(f"{server}/health", timeout=TIMEOUT).json()
    assert body["status"] == "ok"
    assert body["device"] == "cpu"
    assert set(body["stats"]) >= {"requests", "batches", "largest_batch", "received", "rejected"}


def test_caption_a_picture(server, captioner, test_images):
    image = test_images[0]
    response = httpx.post(
        f"{server}/caption",
        files={"image": ("shapes.png", png_bytes(image), "image/png")},
        data={"num_beams": "3", "max_new_tokens": "20", "return_attention": "true"},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    expected = alone(captioner, image, num_beams=3, max_new_tokens=20, return_attention=True)
    assert body["caption"] == expected["caption"] == " ".join(body["tokens"])
    assert body["tokens"] == expected["tokens"] and len(body["tokens"]) >= 2
    assert set(body["tokens"]) <= set(captioner.processor.tokenizer.get_vocab())
    assert (body["num_beams"], body["max_new_tokens"]) == (3, 20)
    side = captioner.model.config.encoded_image_size
    assert body["attention_shape"] == [len(body["tokens"]), side, side]
    attention = np.asarray(body["attention"])
    np.testing.assert_allclose(attention, expected["attention"], atol=1e-6)
    np.testing.assert_allclose(attention.sum(axis=1), 1.0, atol=1e-5)

    # Without return_attention the answer has none; options may also come as query parameters, and the
    # image as the raw request body.
    raw = httpx.post(
        f"{server}/caption?num_beams=1&max_new_tokens=3",
        content=png_bytes(image),
        headers={"content-type": "image/png"},
        timeout=TIMEOUT,
    ).json()
    assert "attention" not in raw
    assert raw["tokens"] == alone(captioner, image, num_beams=1, max_new_tokens=3)["tokens"]
    assert 1 <= len(raw["tokens"]) <= 3


def _truncated(format: str) -> bytes:
    data = png_bytes(Image.effect_noise((64, 64), 60).convert("RGB"), format)
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("name", "data", "status", "reason"),
    [
        ("empty.jpg", b"", 422, "empty file"),
        ("random.jpg", os.urandom(2048), 415, "not an image"),
        ("notes.txt", b"a small red circle\n" * 20, 415, "not an image"),
        ("truncated.png", _truncated("PNG"), 422, "cannot decode"),
        ("truncated.jpg", _truncated("JPEG"), 422, "truncated"),
        ("huge.png", png_bytes(Image.new("L", (1200, 1000))), 413, "1,200,000 pixels"),
    ],
)
def test_bad_images_get_a_clear_4xx(server, name, data, status, reason):
    response = httpx.post(
        f"{server}/caption", files={"image": (name, data, "application/octet-stream")}, timeout=TIMEOUT
    )
    assert response.status_code == status, response.text
    assert reason in response.json()["detail"]


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (40, 30), 128),  # grayscale
        Image.new("RGBA", (40, 30), (255, 0, 0, 0)),  # fully transparent: white, as the processor composites
        Image.new("P", (40, 30)),  # palette
        Image.new("RGB", (1, 1), (0, 0, 255)),
        Image.new("RGB", (10000, 10), (0, 160, 0)),  # extremely wide
    ],
    ids=["grayscale", "rgba", "palette", "1x1", "wide"],
)
def test_unusual_but_valid_images_are_captioned(server, image):
    response = httpx.post(
        f"{server}/caption", files={"image": ("odd.png", png_bytes(image), "image/png")}, timeout=TIMEOUT
    )
    assert response.status_code == 200, response.text
    assert isinstance(response.json()["caption"], str)


def test_request_size_limit(server):
    big = os.urandom(300_000)  # the test server allows 200,000 bytes
    declared = httpx.post(
        f"{server}/caption", files={"image": ("big.jpg", big, "image/jpeg")}, timeout=TIMEOUT
    )
    assert declared.status_code == 413
    assert "larger than the limit of 200,000 bytes" in declared.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the body is counted as it arrives
        for start in range(0, len(big), 50_000):
            yield big[start : start + 50_000]

    streamed = httpx.post(
        f"{server}/caption", content=chunks(), headers={"content-type": "image/jpeg"}, timeout=TIMEOUT
    )
    assert streamed.status_code == 413
    # The service is still fine afterwards.
    assert httpx.get(f"{server}/health", timeout=TIMEOUT).status_code == 200


@pytest.mark.parametrize(
    ("request_kwargs", "status", "reason"),
    [
        ({"files": {"file": ("a.png", b"x", "image/png")}}, 422, 'named "image"'),
        ({"data": {"num_beams": "3"}}, 415, "multipart/form-data"),
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported content type"),
        ({"params": {"num_beams": "0"}}, 422, "num_beams must be between 1 and 10"),
        ({"params": {"num_beams": "three"}}, 422, "num_beams must be an integer"),
        ({"params": {"max_new_tokens": "1000"}}, 422, "max_new_tokens must be between 1 and 100"),
        ({"params": {"return_attention": "maybe"}}, 422, "return_attention must be true or false"),
    ],
    ids=[
        "no-image-field",
        "urlencoded-form",
        "text-body",
        "zero-beams",
        "beams-not-a-number",
        "too-long",
        "bad-bool",
    ],
)
def test_bad_requests_get_a_clear_4xx(server, test_images, request_kwargs, status, reason):
    kwargs = dict(request_kwargs)
    if "params" in kwargs:  # a good image with a bad option
        kwargs["files"] = {"image": ("a.png", png_bytes(test_images[0]), "image/png")}
    response = httpx.post(f"{server}/caption", timeout=TIMEOUT, **kwargs)
    assert response.status_code == status, response.text
    assert reason in response.json()["detail"]


def test_a_burst_of_concurrent_requests_is_batched_and_answered_as_if_alone(captioner, test_images):
    app = create_app(captioner, max_batch_size=8, max_wait_ms=100)
    requests = [
        (index % len(test_images), 1 + index % 2, index % 3 == 0)  # (image, num_beams, return_attention)
        for index in range(24)
    ]
    start = threading.Barrier(len(requests))

    def send(url: str, image: int, beams: int, attention: bool) -> httpx.Response:
        start.wait(timeout=30)  # all at once, so that they meet in the queue
        return httpx.post(
            f"{url}/caption",
            files={"image": (f"{image}.png", png_bytes(test_images[image]), "image/png")},
            data={
                "num_beams": str(beams),
                "max_new_tokens": "12",
                "return_attention": str(attention).lower(),
            },
            timeout=TIMEOUT,
        )

    with running(app) as url, concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        responses = list(pool.map(lambda args: send(url, *args), requests))
        stats = httpx.get(f"{url}/stats", timeout=TIMEOUT).json()

    for (image, beams, attention), response in zip(requests, responses, strict=True):
        assert response.status_code == 200, response.text
        body = response.json()
        expected = alone(
            captioner, test_images[image], num_beams=beams, max_new_tokens=12, return_attention=True
        )
        assert body["tokens"] == expected["tokens"]
        assert body["caption"] == expected["caption"]
        assert ("attention" in body) == attention
        if attention:
            np.testing.assert_allclose(np.asarray(body["attention"]), expected["attention"], atol=1e-5)
    assert stats["requests"] == len(requests) and stats["failed"] == 0
    assert stats["batches"] < len(requests), stats
    assert stats["largest_batch"] > 1, stats


class FlakyCaptioner:
    """Fails on black images: a failing batch must fail only its own requests, and the worker go on."""

    def caption_batch(self, images, options):
        if any(image.getextrema() == ((0, 0), (0, 0), (0, 0)) for image in images):
            raise RuntimeError("boom")
        return [type("R", (), {"attention": None, "caption": "ok"})() for _ in images]


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on():
    batcher = BatchingCaptioner(FlakyCaptioner(), max_batch_size=4, max_wait_ms=1)
    try:
        options = CaptionOptions(num_beams=1, max_new_tokens=5)
        bad = batcher.submit(Image.new("RGB", (4, 4)), options)
        with pytest.raises(RuntimeError, match="boom"):
            bad.result(timeout=10)
        good = batcher.submit(Image.new("RGB", (4, 4), (9, 9, 9)), options)
        assert good.result(timeout=10).caption == "ok"
        assert batcher.stats["failed"] == 1
    finally:
        batcher.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_command_line_service(tmp_path, captioner, test_images):
    model_dir = save_tiny_model(tmp_path / "model")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "show_attend_tell.serve", "--model", str(model_dir), "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the service did not answer /health in time"
            time.sleep(0.25)
        response = httpx.post(
            f"{url}/caption",
            files={"image": ("shapes.png", png_bytes(test_images[1]), "image/png")},
            timeout=TIMEOUT,
        )
        assert response.status_code == 200, response.text
        defaults = {
            "num_beams": captioner.default_num_beams,
            "max_new_tokens": captioner.default_max_new_tokens,
        }
        assert response.json()["tokens"] == alone(captioner, test_images[1], **defaults)["tokens"]
        assert httpx.get(f"{url}/health", timeout=TIMEOUT).json()["model"] == str(model_dir)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
    output = process.stdout.read()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal (exit status -15).
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output
