"""The HTTP service (show_attend_tell.serve), called over 127.0.0.1 as a client would."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import CAPTIONS, sharpened_tiny_model
from PIL import Image
from serve_tiny_model import save_tiny_model, trained_tiny_captioner

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from show_attend_tell import (  # noqa: E402
    ShowAttendTellImageProcessor,
    ShowAttendTellProcessor,
    ShowAttendTellTokenizer,
)
from show_attend_tell.pipeline_show_attend_tell import words_and_attention  # noqa: E402
from show_attend_tell.serve import (  # noqa: E402 - after the optional-dependency checks
    BatchingCaptioner,
    Captioner,
    CaptionOptions,
    DecodeBudget,
    add_search_route,
    create_app,
    decode_cost,
    decode_image,
    header_deadline_protocol,
    parse_args,
)

# Every test needs the trained model (a few seconds of training, once per session).
pytestmark = pytest.mark.slow

TIMEOUT = httpx.Timeout(60.0)


@contextmanager
def running(app, **config: Any) -> Iterator[str]:
    """Serves `app` with uvicorn on 127.0.0.1 and a free port in a thread; yields the base URL. `config`: more
    `uvicorn.Config` arguments."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", **config)
    )
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


def alone(
    captioner: Captioner,
    image: Image.Image,
    num_beams: int,
    max_new_tokens: int,
    return_attention: bool = False,
) -> dict:
    """What generate() gives for one image alone, without the service's code: the reference for every answer."""
    pixel_values = captioner.processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        outputs = captioner.model.generate(
            pixel_values=pixel_values,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            output_attentions=True,
            return_dict_in_generate=True,
        )
    tokenizer = captioner.processor.tokenizer
    sequence = outputs.sequences[0]
    tokens, attention = words_and_attention(sequence, outputs.attention_maps[0], tokenizer)
    return {
        "caption": tokenizer.decode(sequence, skip_special_tokens=True),
        "tokens": tokens,
        "attention": attention,
    }


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
    # Plain requests share batches with return_attention ones (whose attention maps crashed beam search on
    # captions that end at different lengths, failing the whole batch), at beams 1, 3 and 5.
    app = create_app(captioner, max_batch_size=8, max_wait_ms=100)
    requests = [
        (
            index % len(test_images),
            (1, 3, 5)[index % 3],
            index % 4 == 0,
        )  # (image, num_beams, return_attention)
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
    """Fails on all-zero inputs: a failing batch must fail only its own requests, and the worker go on."""

    def caption_pixels(self, pixel_values, options):
        if (pixel_values.flatten(1) == 0).all(dim=1).any():
            raise RuntimeError("boom")
        return [type("R", (), {"attention": None, "caption": "ok"})() for _ in pixel_values]


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on():
    batcher = BatchingCaptioner(FlakyCaptioner(), max_batch_size=4, max_wait_ms=1)
    try:
        options = CaptionOptions(num_beams=1, max_new_tokens=5)
        bad = batcher.submit(torch.zeros(3, 4, 4), options)
        with pytest.raises(RuntimeError, match="boom"):
            bad.result(timeout=10)
        good = batcher.submit(torch.ones(3, 4, 4), options)
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
    command += [
        "--queue-size",
        "5",
        "--decode-budget-mb",
        "512",
        "--decode-threads",
        "1",
        "--body-timeout",
        "20",
        "--header-timeout",
        "1",
    ]
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
        health = httpx.get(f"{url}/health", timeout=TIMEOUT).json()
        assert health["model"] == str(model_dir)
        assert health["batching"]["max_queue"] == 5 and health["body_timeout_s"] == 20
        assert health["decoding"] == {"threads": 1, "budget_bytes": 512 * 2**20, "wait_s": 30.0}
        with socket.create_connection(("127.0.0.1", port), timeout=30) as silent:
            assert _read_until_closed(silent).startswith(b"HTTP/1.1 408")  # --header-timeout reached uvicorn
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
    assert "request headers not complete within 1 s, connection closed" in output


# --- the schema ------------------------------------------------------------------------------------------


def _bounds(schema: dict) -> tuple:
    """(minimum, maximum) of an optional integer field's schema (`anyOf: [{integer...}, {null}]`)."""
    for option in schema.get("anyOf", [schema]):
        if option.get("type") == "integer":
            return option.get("minimum"), option.get("maximum")
    raise AssertionError(f"not an integer field: {schema}")


def test_openapi_documents_the_caption_fields(server):
    response = httpx.get(f"{server}/openapi.json", timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    spec = response.json()
    post = spec["paths"]["/caption"]["post"]
    query = {parameter["name"]: parameter for parameter in post["parameters"]}
    assert set(query) == {"num_beams", "max_new_tokens", "return_attention"}
    assert _bounds(query["num_beams"]["schema"]) == (1, 10)  # the test server's max_beams
    assert _bounds(query["max_new_tokens"]["schema"]) == (1, 100)
    assert all(parameter["description"] for parameter in query.values())

    form_ref = post["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    form = spec["components"]["schemas"][form_ref.rsplit("/", 1)[-1]]["properties"]
    assert set(form) == {"image", "num_beams", "max_new_tokens", "return_attention"}
    image_schema = form["image"]["anyOf"][0]
    assert image_schema.get("format") == "binary" or image_schema.get("contentMediaType"), form["image"]
    assert _bounds(form["num_beams"]) == (1, 10) and _bounds(form["max_new_tokens"]) == (1, 100)

    answer_ref = post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    answer = spec["components"]["schemas"][answer_ref.rsplit("/", 1)[-1]]
    assert set(answer["required"]) == {"caption", "tokens", "num_beams", "max_new_tokens"}
    assert {"attention", "attention_shape"} <= set(answer["properties"])
    for status in ("408", "413", "415", "422", "503"):
        error_ref = post["responses"][status]["content"]["application/json"]["schema"]["$ref"]
        error_fields = spec["components"]["schemas"][error_ref.rsplit("/", 1)[-1]]["properties"]
        assert set(error_fields) == {"detail"} and error_fields["detail"]["type"] == "string"
    docs = httpx.get(f"{server}/docs", timeout=TIMEOUT)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"num_beams": "11"}, "num_beams must be between 1 and 10, got 11"),
        ({"max_new_tokens": "0"}, "max_new_tokens must be between 1 and 100, got 0"),
        ({"num_beams": "2.5"}, "num_beams must be an integer, got '2.5'"),
        ({"return_attention": "maybe"}, "return_attention must be true or false, got 'maybe'"),
    ],
)
def test_bad_form_options_get_the_same_422_as_query_parameters(server, test_images, fields, reason):
    response = httpx.post(
        f"{server}/caption",
        files={"image": ("a.png", png_bytes(test_images[0]), "image/png")},
        data=fields,
        timeout=TIMEOUT,
    )
    assert response.status_code == 422, response.text
    assert response.json() == {"detail": reason}


def test_form_options_win_over_query_parameters(server, captioner, test_images):
    response = httpx.post(
        f"{server}/caption?num_beams=1&max_new_tokens=2",
        files={"image": ("a.png", png_bytes(test_images[2]), "image/png")},
        data={"num_beams": "3", "max_new_tokens": "9"},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["num_beams"], body["max_new_tokens"]) == (3, 9)
    assert body["tokens"] == alone(captioner, test_images[2], num_beams=3, max_new_tokens=9)["tokens"]


def test_an_image_field_that_is_not_a_file_is_refused(server):
    response = httpx.post(
        f"{server}/caption",
        files={"other": ("a.txt", b"x", "text/plain")},
        data={"image": "photo.jpg"},
        timeout=TIMEOUT,
    )
    assert response.status_code == 422, response.text
    assert 'multipart file field named "image"' in response.json()["detail"]


#: The service's OpenAPI schema as it was before the endpoints moved out of create_app (issue 19).
OPENAPI_FIXTURE = Path(__file__).parent / "fixtures" / "serve_openapi.json"


def schema_captioner() -> Captioner:
    """conftest's untrained tiny model: the schema depends on its generation defaults, not on its weights."""
    tokenizer = ShowAttendTellTokenizer.train_from_captions(CAPTIONS, min_freq=5)
    processor = ShowAttendTellProcessor(ShowAttendTellImageProcessor(size=64), tokenizer)
    return Captioner(sharpened_tiny_model(len(tokenizer)), processor)


def openapi_declarations(captioner: Captioner) -> dict:
    """
    The info and every path of the schema of a service with limits of its own and GET /search, with each
    ``$ref`` replaced by the schema it names: parameters, form fields with their bounds, defaults and
    descriptions, answers and errors, independent of how FastAPI names its components.
    """
    app = create_app(captioner, max_beams=7, max_new_tokens_limit=40, max_upload_bytes=1000)
    add_search_route(app, None, max_top_k=25)  # the schema never queries the retriever
    spec = app.openapi()
    components = spec["components"]["schemas"]

    def resolved(node):
        if isinstance(node, dict):
            if "$ref" in node:
                named = components[node["$ref"].rsplit("/", 1)[-1]]
                return resolved({**named, **{k: v for k, v in node.items() if k != "$ref"}})
            return {key: resolved(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolved(value) for value in node]
        return node

    return json.loads(json.dumps({"info": spec["info"], "paths": resolved(spec["paths"])}))


def write_openapi_fixture() -> None:
    """Records the schema; only for an intended change of the API (from tests/: ``python -c "import test_serve;
    test_serve.write_openapi_fixture()"``)."""
    declarations = openapi_declarations(schema_captioner())
    OPENAPI_FIXTURE.write_text(json.dumps(declarations, indent=1, sort_keys=True) + "\n")


def differences(recorded, now, where: str = "") -> list[str]:
    """Where two JSON documents differ, one line per differing value: what a reader of a failure needs."""
    if isinstance(recorded, dict) and isinstance(now, dict):
        return [
            line
            for key in sorted(set(recorded) | set(now))
            for line in differences(recorded.get(key, "(absent)"), now.get(key, "(absent)"), f"{where}/{key}")
        ]
    if isinstance(recorded, list) and isinstance(now, list) and len(recorded) == len(now):
        return [
            line
            for i, (a, b) in enumerate(zip(recorded, now, strict=True))
            for line in differences(a, b, f"{where}[{i}]")
        ]
    return [] if recorded == now else [f"{where}: was {recorded!r}, now {now!r}"]


def test_the_openapi_schema_declares_what_it_did():
    now = openapi_declarations(schema_captioner())
    assert sorted(now["paths"]) == ["/caption", "/health", "/search", "/stats"]
    changed = differences(json.loads(OPENAPI_FIXTURE.read_text()), now)
    assert not changed, "\n".join(changed)


# --- memory: the decode budget, decoding threads and the queue -------------------------------------------


def sixteen_bit_png(width: int, height: int, seed: int) -> bytes:
    """A real 16-bit grey PNG (Pillow mode "I;16"): a gradient with noise, so that pictures differ."""
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 60_000, width, dtype=np.float64)[None, :] * np.linspace(0.2, 1, height)[:, None]
    noise = rng.integers(0, 4_000, (height, width))
    picture = Image.fromarray((gradient + noise).astype(np.uint16))
    assert picture.mode == "I;16"
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


BIG = (1600, 1200)  # 1.9 megapixels: 16-bit grey costs 40 bytes per pixel to decode, 77 MB


@pytest.fixture(scope="module")
def big_pictures() -> list[bytes]:
    return [sixteen_bit_png(*BIG, seed) for seed in range(4)]


class GatedCaptioner(Captioner):
    """
    Holds the decoding of large pictures (its `prepare`, which runs in a decoding thread while the picture's
    share of the budget is reserved) until the test opens the gate, and counts the decodings running at once.
    """

    def __init__(self, captioner: Captioner) -> None:
        super().__init__(captioner.model, captioner.processor)
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.inside = 0
        self.most_inside = 0

    def prepare(self, image: Image.Image):
        if image.width < BIG[0]:
            return super().prepare(image)
        with self.lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        try:
            assert self.gate.wait(timeout=60), "the test never opened the gate"
            return super().prepare(image)
        finally:
            with self.lock:
                self.inside -= 1


def wait_until(condition, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def get_stats(url: str) -> dict:
    return httpx.get(f"{url}/stats", timeout=TIMEOUT).json()


def post_picture(url: str, data: bytes, **fields) -> httpx.Response:
    return httpx.post(
        f"{url}/caption",
        files={"image": ("picture.png", data, "image/png")},
        data={"num_beams": "3", "max_new_tokens": "8", **fields},
        timeout=TIMEOUT,
    )


def test_the_decoding_cost_is_read_from_the_header(big_pictures, test_images):
    assert decode_cost(big_pictures[0]) == BIG[0] * BIG[1] * 40
    assert decode_cost(png_bytes(test_images[0])) == test_images[0].width * test_images[0].height * 24
    assert decode_cost(png_bytes(Image.new("RGBA", (10, 20)))) == 10 * 20 * 28


#: Decodes one picture file as the service does and prints how much the process's peak memory grew (bytes).
#: The decoding runs in a forked child: its peak starts at its size then, not at the imports' own peak.
_MEASURE_DECODING = """
import os, re, sys
from show_attend_tell import ShowAttendTellImageProcessor
from show_attend_tell.serve import decode_image
def peak(): return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
data = open(sys.argv[1], "rb").read()
processor = ShowAttendTellImageProcessor()
processor([decode_image(open(sys.argv[2], "rb").read())], return_tensors="pt")  # a small one first: warm-up
read, write = os.pipe()
if os.fork() == 0:
    before = peak()
    processor([decode_image(data, None)], return_tensors="pt")
    os.write(write, str(peak() - before).encode())
    os._exit(0)
os.close(write)
os.wait()
print(os.read(read, 100).decode())
"""


def _picture_of_mode(mode: str, side: int) -> bytes:
    if mode == "I;16":
        return sixteen_bit_png(side, side, seed=1)
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).convert(mode)
    return png_bytes(picture)


@pytest.mark.skipif(
    not os.path.exists("/proc/self/status"), reason="reads the peak memory from Linux's /proc"
)
@pytest.mark.parametrize("mode", ["I;16", "RGB", "RGBA", "P"])
def test_the_decoding_cost_covers_the_memory_decoding_takes(tmp_path, mode):
    picture, warm_up = tmp_path / "picture.png", tmp_path / "small.png"
    picture.write_bytes(_picture_of_mode(mode, 2000))
    warm_up.write_bytes(_picture_of_mode(mode, 16))
    command = [sys.executable, "-c", _MEASURE_DECODING, str(picture), str(warm_up)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    measured = int(subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout)
    cost = decode_cost(picture.read_bytes())
    assert cost / 3 < measured <= cost, (measured, cost)


def test_decoded_bytes_in_flight_stay_within_the_shared_budget(captioner, test_images, big_pictures):
    cost = decode_cost(big_pictures[0])
    small = png_bytes(test_images[3])
    gated = GatedCaptioner(captioner)
    # Room for one big picture and some small ones, never two big ones.
    app = create_app(gated, decode_budget_bytes=cost * 3 // 2, decode_threads=4, decode_wait_s=60)
    with running(app) as url, concurrent.futures.ThreadPoolExecutor(4) as pool:
        first = pool.submit(post_picture, url, big_pictures[0])
        wait_until(lambda: gated.inside == 1, "the first big picture is decoding")
        # A small picture fits beside it: the budget counts bytes, not requests.
        beside = post_picture(url, small)
        assert beside.status_code == 200, beside.text
        others = [pool.submit(post_picture, url, data) for data in big_pictures[1:]]
        wait_until(lambda: get_stats(url)["decode_waiting"] == 3, "the other three wait for the budget")
        assert get_stats(url)["decode_bytes_in_use"] == cost and gated.inside == 1
        gated.gate.set()
        responses = [first.result(timeout=120)] + [future.result(timeout=120) for future in others]
        stats = get_stats(url)

    for data, response in zip(big_pictures, responses, strict=True):
        assert response.status_code == 200, response.text
        expected = alone(captioner, decode_image(data), num_beams=3, max_new_tokens=8)
        assert response.json()["tokens"] == expected["tokens"]
    assert gated.most_inside == 1  # never two big pictures decoded at once
    assert stats["decode_bytes_peak"] == cost + decode_cost(small) <= stats["decode_budget_bytes"]
    assert stats["decode_bytes_in_use"] == 0 and stats["decode_waiting"] == 0
    assert (stats["decode_waited"], stats["decode_refused"]) == (3, 0)


def test_a_busy_decode_budget_answers_503_with_retry_after(captioner, test_images, big_pictures):
    cost = decode_cost(big_pictures[0])
    gated = GatedCaptioner(captioner)
    app = create_app(gated, decode_budget_bytes=cost * 3 // 2, decode_wait_s=0)
    with running(app) as url, concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(post_picture, url, big_pictures[0])
        wait_until(lambda: gated.inside == 1, "the first big picture is decoding")
        busy = post_picture(url, big_pictures[1])
        assert busy.status_code == 503, busy.text
        assert busy.headers["retry-after"] == "1"
        assert "busy (decoding other pictures)" in busy.json()["detail"]
        assert post_picture(url, png_bytes(test_images[0])).status_code == 200  # small ones still fit
        gated.gate.set()
        assert first.result(timeout=120).status_code == 200
        stats = get_stats(url)
    assert stats["decode_refused"] == 1 and stats["decode_bytes_in_use"] == 0


def test_a_picture_that_alone_needs_more_than_the_budget_is_refused(captioner, big_pictures):
    app = create_app(captioner, decode_budget_bytes=decode_cost(big_pictures[0]) - 1)
    with running(app) as url:
        response = post_picture(url, big_pictures[0])
        assert response.status_code == 413, response.text
        assert "more than the decode budget" in response.json()["detail"]
        assert get_stats(url)["decode_bytes_peak"] == 0  # refused from the header, nothing decoded


def test_decoding_threads_are_limited(captioner, big_pictures):
    gated = GatedCaptioner(captioner)
    app = create_app(gated, decode_budget_bytes=10 * decode_cost(big_pictures[0]), decode_threads=2)
    with running(app) as url, concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(post_picture, url, data) for data in big_pictures[:3]]
        # All three hold their share of the budget; two decode, the third waits for a thread.
        wait_until(
            lambda: (
                get_stats(url)["decode_bytes_in_use"] == 3 * decode_cost(big_pictures[0])
                and gated.inside == 2
            ),
            "two pictures are decoding and the third is waiting for a thread",
        )
        gated.gate.set()
        assert all(future.result(timeout=120).status_code == 200 for future in futures)
    assert gated.most_inside == 2


def test_a_full_queue_answers_503_with_retry_after(captioner, test_images):
    started, release = threading.Event(), threading.Event()

    class SlowModel(Captioner):
        def caption_pixels(self, pixel_values, options):
            started.set()
            assert release.wait(timeout=60), "the test never released the model"
            return super().caption_pixels(pixel_values, options)

    app = create_app(SlowModel(captioner.model, captioner.processor), max_queue=1, max_wait_ms=0)
    with running(app) as url, concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(post_picture, url, png_bytes(test_images[0]))
        assert started.wait(timeout=60)  # the worker holds the first request
        second = pool.submit(post_picture, url, png_bytes(test_images[1]))
        wait_until(lambda: get_stats(url)["queued"] == 1, "the second request is queued")
        full = post_picture(url, png_bytes(test_images[2]))
        assert full.status_code == 503, full.text
        assert full.headers["retry-after"] == "1" and "too many queued requests" in full.json()["detail"]
        release.set()
        assert first.result(timeout=120).status_code == 200 and second.result(timeout=120).status_code == 200


def test_the_decode_budget_serves_waiters_first_come_first_served():
    import asyncio

    async def scenario() -> list[str]:
        budget = DecodeBudget(100)
        order: list[str] = []
        assert await budget.acquire(60, timeout=1)

        async def request(name: str, cost: int, timeout: float) -> None:
            if await budget.acquire(cost, timeout):
                order.append(name)
            else:
                order.append(f"{name} refused")

        large = asyncio.create_task(request("large", 90, timeout=5))
        await asyncio.sleep(0)
        small = asyncio.create_task(request("small", 10, timeout=5))  # would fit now, but waits its turn
        late = asyncio.create_task(request("late", 50, timeout=0.01))
        await late
        assert budget.stats["decode_waiting"] == 2 and budget.stats["decode_bytes_in_use"] == 60
        budget.release(60)
        await asyncio.gather(large, small)
        assert budget.stats["decode_bytes_in_use"] == 100 and budget.stats["decode_bytes_peak"] == 100
        budget.release(90)
        budget.release(10)
        assert budget.stats["decode_refused"] == 1
        with pytest.raises(ValueError, match="can never fit"):
            await budget.acquire(101, timeout=0)
        return order

    assert asyncio.run(scenario()) == ["late refused", "large", "small"]


# --- request bodies that stall ---------------------------------------------------------------------------


def _half_sent_requests(picture: bytes) -> list[bytes]:
    """Requests whose headers promise more body than is sent: raw, multipart and chunked uploads."""
    boundary = "b0undary"
    multipart = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + picture
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return [
        b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        + f"Content-Length: {len(picture)}\r\n\r\n".encode()
        + picture[: len(picture) // 2],
        f"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n".encode()
        + f"Content-Length: {len(multipart)}\r\n\r\n".encode()
        + multipart[: len(multipart) // 2],
        b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{len(picture) // 2:x}\r\n".encode()
        + picture[: len(picture) // 2]
        + b"\r\n",  # no closing zero-length chunk
    ]


def _read_until_closed(connection: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a recv timeout fails the test)."""
    answer = b""
    for _ in range(1000):  # bounded: a server that never closes fails on the socket timeout first
        chunk = connection.recv(65536)
        if not chunk:
            return answer
        answer += chunk
    raise AssertionError(f"the server kept sending: {answer[:200]!r}")


def _read_one_response(connection: socket.socket) -> bytes:
    """One whole response on a kept-alive connection: its head, then as many body bytes as Content-Length says.

    A single ``recv`` may return the head alone, with the body still in flight.
    """
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = connection.recv(65536)
        assert chunk, f"closed before the response's head was complete: {answer[:200]!r}"
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lengths = [
        line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    ]
    assert len(lengths) == 1, head
    while len(body) < int(lengths[0]):
        chunk = connection.recv(65536)
        assert chunk, f"closed before the body was complete: {answer[:200]!r}"
        body += chunk
    assert len(body) == int(lengths[0]), "the server sent more than one response"
    return head + b"\r\n\r\n" + body


def test_stalled_request_bodies_get_408_and_the_connection_is_closed(captioner, test_images):
    app = create_app(captioner, body_timeout_s=0.5)
    requests = _half_sent_requests(png_bytes(test_images[0])) * 10  # 30 stalled uploads at once
    with running(app) as url:
        port = int(url.rsplit(":", 1)[1])
        connections = []
        try:
            for request in requests:
                connection = socket.create_connection(("127.0.0.1", port), timeout=10)
                connections.append(connection)
                connection.sendall(request)
            answers = [_read_until_closed(connection) for connection in connections]
        finally:
            for connection in connections:
                connection.close()
        health = httpx.get(f"{url}/health", timeout=TIMEOUT)
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer[:300]
        assert b"connection: close" in head.lower()
        assert b"did not arrive within 0.5 s" in body
    assert health.status_code == 200
    assert health.json()["stats"]["rejected"] == len(requests)


def test_a_complete_slow_body_within_the_timeout_is_served(captioner, test_images):
    app = create_app(captioner, body_timeout_s=30)
    picture = png_bytes(test_images[0])
    with (
        running(app) as url,
        socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=30) as s,
    ):
        s.sendall(
            b"POST /caption?num_beams=1 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nConnection: close\r\n"
            + f"Content-Length: {len(picture)}\r\n\r\n".encode()
        )
        for start in range(0, len(picture), len(picture) // 4 + 1):  # in four pieces
            s.sendall(picture[start : start + len(picture) // 4 + 1])
            time.sleep(0.05)
        answer = _read_until_closed(s)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


def test_silent_or_slow_request_headers_get_408_and_the_connection_is_closed(captioner, test_images):
    timeout_s = 0.5
    picture = png_bytes(test_images[0])
    request = (
        b"POST /caption?num_beams=1 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        + f"Content-Length: {len(picture)}\r\n\r\n".encode()
        + picture
    )
    with running(create_app(captioner), http=header_deadline_protocol(timeout_s)) as url:
        port = int(url.rsplit(":", 1)[1])
        silent = socket.create_connection(("127.0.0.1", port), timeout=10)
        stalled = socket.create_connection(("127.0.0.1", port), timeout=10)
        stalled.sendall(b"POST /caption HTTP/1.1\r\nHost: x\r\n")  # and no blank line
        # one byte every 0.1 s, for three times the timeout: each byte must not push the deadline back
        dripping = socket.create_connection(("127.0.0.1", port), timeout=10)
        started = time.monotonic()
        closed_early = False
        for byte in request[:30]:
            try:
                dripping.sendall(bytes([byte]))
            except OSError:  # the server closed it
                closed_early = True
                break
            time.sleep(0.1)
        answers = [_read_until_closed(connection) for connection in (silent, stalled, dripping)]
        dripping_s = time.monotonic() - started
        # a complete request is served, and so is a second one after an idle pause longer than the timeout
        with socket.create_connection(("127.0.0.1", port), timeout=30) as keep_alive:
            keep_alive.sendall(request)
            first = _read_one_response(keep_alive)
            time.sleep(2 * timeout_s)
            keep_alive.sendall(request.replace(b"Host: x", b"Host: x\r\nConnection: close"))
            second = _read_until_closed(keep_alive)
        health = httpx.get(f"{url}/health", timeout=TIMEOUT)
        for connection in (silent, stalled, dripping):
            connection.close()
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer[:300]
        assert b"connection: close" in head.lower()
        assert json.loads(body) == {"detail": f"the request headers did not arrive within {timeout_s:g} s"}
    assert closed_early or dripping_s < 3 * timeout_s * 0.9 + 1.0
    assert first.startswith(b"HTTP/1.1 200"), first[:300]
    assert second.startswith(b"HTTP/1.1 200"), second[:300]
    assert health.status_code == 200


def test_the_header_deadline_finds_the_state_it_reads_in_the_installed_uvicorn():
    """The deadline reads uvicorn's h11 connection (`H11Protocol.conn`): a release without it fails here, with
    the message the service would give at its first connection."""
    from uvicorn.server import ServerState

    async def app(scope: dict, receive: Any, send: Any) -> None:
        raise AssertionError("never called")

    config = uvicorn.Config(app)
    config.load()
    protocol = header_deadline_protocol(1.0)(
        config=config, server_state=ServerState(), app_state={}, _loop=asyncio.new_event_loop()
    )
    assert protocol.header_timer is None


def test_the_command_line_options_reach_the_service():
    args = parse_args(
        [
            "--model",
            "m",
            "--queue-size",
            "7",
            "--decode-budget-mb",
            "64",
            "--decode-threads",
            "3",
            "--body-timeout",
            "5",
            "--header-timeout",
            "2.5",
        ]
    )
    settings = (
        args.queue_size,
        args.decode_budget_mb,
        args.decode_threads,
        args.body_timeout,
        args.header_timeout,
    )
    assert settings == (7, 64, 3, 5, 2.5)
    for bad in (
        ["--queue-size", "0"],
        ["--decode-threads", "0"],
        ["--body-timeout", "0"],
        ["--header-timeout", "-1"],
        ["--decode-budget-mb", "-1"],
    ):
        with pytest.raises(SystemExit):
            parse_args(["--model", "m", *bad])
