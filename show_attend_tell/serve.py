"""An HTTP captioning service: `python -m show_attend_tell.serve --model DIR --port 8000`.

Endpoints:

* ``POST /caption``: the picture as a multipart file field named ``image`` (or the raw bytes as the
  request body with an ``image/*`` content type). Options as form fields or query parameters:
  ``num_beams`` (default: the model's generation config), ``max_new_tokens`` (idem) and
  ``return_attention`` (false). Answers ``{"caption", "tokens", "num_beams", "max_new_tokens"}`` plus,
  with ``return_attention``, ``attention`` (one map of ``h * w`` weights per token, row-major) and
  ``attention_shape`` (``[tokens, h, w]``).
* ``GET /search?q=...&top_k=...`` (with ``--index PATH``, a caption index made by ``scripts/search_images.py
  build``): text to images, the index's best candidates re-ranked by the model. Answers ``{"query", "hits":
  [{"rank", "score", "image", "captions"}], "reason", "candidates"}``; a query that cannot match gives no hits
  and a ``reason``.
* ``GET /health``: ``{"status": "ok", "model", "device", "batching", "decoding", "body_timeout_s", "stats"}``.
* ``GET /stats``: the counters alone (requests, batches, largest batch, errors, queued requests, the decode
  budget's bytes in use and at most so far, requests waiting for it, that waited, refused).

Errors are JSON ``{"detail": "..."}`` with a reason a person can act on: 408 for request headers or a
request body that do not arrive within their timeouts (``main`` serves with ``header_deadline_protocol``),
413 for a request above the upload limit, an image with more pixels than allowed or one whose decoding alone
would take more memory than the decode budget, 415 for a file that is not an image Pillow can read, 422 for
an empty, truncated or corrupt image or a bad option, 503 (with ``Retry-After``) when the queue is full or the
decode budget stayed in use too long. ``GET /openapi.json`` and ``/docs`` describe every field with its bounds.

Memory: a picture is decoded only once its decoding cost (its width x height x the peak bytes per pixel
that decoding and converting its Pillow mode take, read from the header) is reserved from a budget of
decoded bytes shared by all requests. A request whose cost does not fit waits, first come first served, up
to ``decode_wait_s``, then gets 503. At most ``decode_threads`` pictures decode at once, and what waits for
the model is the picture's small model input (3 x 256 x 256 floats), never the decoded picture, so the queue
of ``max_queue`` requests holds a bounded amount too.

Batching: requests are decoded concurrently, then queued for one background thread that owns the model.
It takes the first waiting request, keeps collecting for up to ``max_wait_ms`` or until
``max_batch_size`` requests are waiting, and captions each group of requests with the same options with
one ``generate()`` call. Under load the model thus sees batches (several times the throughput on a GPU);
a lone request waits at most ``max_wait_ms``. Every image is processed on its own by the image processor
and the search keeps each image's beams apart, so a request gets the same caption batched or alone.

FastAPI and uvicorn are an optional extra (``pip install -e ".[serve]"`` in a clone); the
:class:`Captioner` and :class:`BatchingCaptioner` classes work without them.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import io
import json
import logging
import math
import os
import queue
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from . import captioning
from .device import add_device_argument, pick_device
from .errors import one_line
from .image_processing_show_attend_tell import describe_image_error, to_rgb

try:  # at module level because FastAPI resolves the endpoints' string annotations in this namespace
    from fastapi import UploadFile
    from starlette.requests import Request
except ImportError:  # the optional [serve] extra is missing: only create_app needs it, and says so
    Request = UploadFile = Any

if TYPE_CHECKING:
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.responses import JSONResponse

    from .modeling_show_attend_tell import ShowAttendTellForConditionalGeneration
    from .processing_show_attend_tell import ShowAttendTellProcessor

logger = logging.getLogger(__name__)

__all__ = [
    "BatchingCaptioner",
    "CaptionOptions",
    "CaptionResult",
    "Captioner",
    "ImageRejected",
    "create_app",
    "decode_image",
    "main",
]

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
#: About a 50-megapixel photo; decoding one takes 150 MB, so the limit bounds memory per request.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_MAX_WAIT_MS = 10.0
DEFAULT_MAX_BEAMS = 10
DEFAULT_MAX_NEW_TOKENS_LIMIT = 100
DEFAULT_QUEUE_SIZE = 256
DEFAULT_REQUEST_TIMEOUT_S = 120.0
#: Enough to decode one picture of DEFAULT_MAX_IMAGE_PIXELS in any mode (16-bit grey: 40 bytes per pixel).
DEFAULT_DECODE_BUDGET_BYTES = 2 * 1024**3
DEFAULT_DECODE_THREADS = min(4, os.cpu_count() or 1)
#: How long a request waits for its share of the decode budget before it gets 503.
DEFAULT_DECODE_WAIT_S = 30.0
#: How long a client may take to send a whole request body (a stalled upload holds a connection and memory).
DEFAULT_BODY_TIMEOUT_S = 60.0
#: How long a client may take to send a request's headers (a silent or dripping client holds a connection).
DEFAULT_HEADER_TIMEOUT_S = 20.0


# --------------------------------------------------------------------------------------------------
# Captioning (no web framework needed)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionOptions:
    """Decoding options of one request. Requests with equal options can share one generate() call."""

    num_beams: int
    max_new_tokens: int
    return_attention: bool = False

    @property
    def group_key(self) -> tuple[int, int]:
        # Attention is computed for the whole group if any request wants it; it does not change the captions.
        return (self.num_beams, self.max_new_tokens)


@dataclass
class CaptionResult:
    """One caption: the text, its words (``<unk>`` included), and per word the attention over the grid."""

    caption: str
    tokens: list[str]
    attention: np.ndarray | None = None  # (len(tokens), num_pixels), float32

    def to_json(self, grid: tuple[int, int]) -> dict[str, Any]:
        body: dict[str, Any] = {"caption": self.caption, "tokens": self.tokens}
        if self.attention is not None:
            body["attention"] = self.attention.astype(float).tolist()
            body["attention_shape"] = [len(self.tokens), *grid]
        return body


class Captioner:
    """
    Captions batches of decoded images with a model and its processor, on the model's device.

    Args:
        model: the captioning model (put in eval mode here).
        processor: its processor (image processor and tokenizer).
    """

    def __init__(
        self, model: ShowAttendTellForConditionalGeneration, processor: ShowAttendTellProcessor
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        #: What /health reports as the model: its folder when loaded with from_pretrained.
        self.name = str(getattr(model.config, "_name_or_path", "") or "model")
        side = int(model.config.encoded_image_size)
        self.grid = (side, side)
        generation = model.generation_config
        self.default_num_beams = int(getattr(generation, "num_beams", None) or 1)
        self.default_max_new_tokens = int(getattr(generation, "max_new_tokens", None) or 50)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
    ) -> Captioner:
        """
        Loads a model folder (safetensors only) onto ``device`` (`pick_device`'s choice: by default CUDA, then
        Apple MPS, then the CPU) with `load_model_and_processor`: the folder's code files run only with
        ``trust_remote_code``. A device this machine lacks raises ValueError (one line).
        """
        from .hub import load_model_and_processor

        device = pick_device(device)
        model, processor = load_model_and_processor(
            model_dir, device=device, dtype=dtype, trust_remote_code=trust_remote_code
        )
        return cls(model, processor)

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """One RGB picture -> its model input ``(3, height, width)``: small enough to wait in a queue."""
        return self.processor.image_processor([image], return_tensors="pt")["pixel_values"][0]

    def caption_batch(self, images: Sequence[Image.Image], options: CaptionOptions) -> list[CaptionResult]:
        """One generate() call for all ``images`` (RGB PIL images) with the same options; one result per image."""
        return self.caption_pixels(torch.stack([self.prepare(image) for image in images]), options)

    def caption_pixels(self, pixel_values: torch.Tensor, options: CaptionOptions) -> list[CaptionResult]:
        """One generate() call for prepared pictures ``(images, 3, height, width)``; one result per picture."""
        results = captioning.caption_batch(
            self.model,
            self.processor.tokenizer,
            pixel_values,
            num_beams=options.num_beams,
            max_new_tokens=options.max_new_tokens,
            num_return_sequences=1,
            output_attentions=options.return_attention,
        )
        return [CaptionResult(result.caption, result.words, result.attention) for result in results]


@dataclass
class _Job:
    pixel_values: torch.Tensor  # (3, height, width), from Captioner.prepare
    options: CaptionOptions
    future: concurrent.futures.Future


_STOP = object()


class BatchingCaptioner:
    """
    Collects captioning requests (prepared pictures, see :meth:`Captioner.prepare`) from many threads and runs
    them in batches on one worker thread.

    :meth:`submit` returns a ``concurrent.futures.Future`` at once; the worker takes the first waiting
    request, waits up to ``max_wait_ms`` for more (or until ``max_batch_size`` are waiting), and runs one
    generate() per group of requests with the same decoding options. Only the worker touches the model.

    Args:
        captioner: what runs the batches.
        max_batch_size: most requests per batch.
        max_wait_ms: longest time the first request of a batch waits for company.
        max_queue: requests waiting beyond this make :meth:`submit` raise ``queue.Full`` (back-pressure).
    """

    def __init__(
        self,
        captioner: Captioner,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
        max_queue: int = DEFAULT_QUEUE_SIZE,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be 0 or more, got {max_wait_ms}")
        self.captioner = captioner
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._stats = {"requests": 0, "batches": 0, "largest_batch": 0, "failed": 0}
        self._thread = threading.Thread(target=self._run, name="caption-batcher", daemon=True)
        self._thread.start()

    @property
    def stats(self) -> dict[str, int]:
        """``requests`` captioned or failed, ``batches`` (generate() calls), ``largest_batch``, ``failed``,
        ``queued`` (waiting now)."""
        with self._lock:
            return {**self._stats, "queued": self._queue.qsize()}

    def submit(self, pixel_values: torch.Tensor, options: CaptionOptions) -> concurrent.futures.Future:
        """Queues one prepared picture ``(3, height, width)``; the future's result is its :class:`CaptionResult`."""
        if not self._thread.is_alive():
            raise RuntimeError("the batcher is closed")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put_nowait(_Job(pixel_values, options, future))
        return future

    def close(self, timeout: float | None = 10.0) -> None:
        """Finishes the queued requests, then stops the worker."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        """The first job plus whatever arrives within the wait window; True if a stop was requested."""
        jobs = [first]
        deadline = time.monotonic() + self.max_wait
        while len(jobs) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return jobs, True
            jobs.append(item)
        return jobs, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            jobs, stopping = self._collect(first)
            # A client that gave up (cancelled future) costs no model time.
            jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            groups: dict[tuple[int, int], list[_Job]] = {}
            for job in jobs:
                groups.setdefault(job.options.group_key, []).append(job)
            for group in groups.values():
                self._run_group(group)

    def _run_group(self, group: list[_Job]) -> None:
        first = group[0].options
        options = CaptionOptions(
            first.num_beams, first.max_new_tokens, any(job.options.return_attention for job in group)
        )
        try:
            results = self.captioner.caption_pixels(torch.stack([job.pixel_values for job in group]), options)
        except Exception as error:  # reported to every waiting request; the worker keeps serving
            logger.exception("captioning a batch of %d failed", len(group))
            with self._lock:
                self._stats["failed"] += len(group)
                self._stats["requests"] += len(group)
                self._stats["batches"] += 1
            for job in group:
                job.future.set_exception(error)
            return
        with self._lock:
            self._stats["requests"] += len(group)
            self._stats["batches"] += 1
            self._stats["largest_batch"] = max(self._stats["largest_batch"], len(group))
        for job, result in zip(group, results, strict=True):
            if not job.options.return_attention:
                result.attention = None
            job.future.set_result(result)


# --------------------------------------------------------------------------------------------------
# Uploads
# --------------------------------------------------------------------------------------------------


class ImageRejected(ValueError):
    """An upload that is not a usable image; ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


#: Peak bytes per pixel of decoding a picture of each Pillow mode and preparing it for the model (decode_image,
#: then the image processor, which copy it several times), measured on 2000 and 4000 px square pictures as the
#: growth of a fresh process's peak memory: 14 to 22 for modes of 8 bits per channel and 32-bit floats, 18 to
#: 25 with transparency, 32 to 38 for 16-bit grey and 32-bit integers (to_rgb scales those through float64
#: arrays); rounded up with about 10% added. Any other mode is counted at the highest figure.
_DECODE_BYTES_PER_PIXEL = {
    **dict.fromkeys(("1", "L", "P", "RGB", "CMYK", "YCbCr", "LAB", "HSV", "F"), 24),
    **dict.fromkeys(("LA", "La", "PA", "RGBA", "RGBa"), 28),
}
_MOST_BYTES_PER_PIXEL = 40


@contextlib.contextmanager
def _opened(data: bytes, max_pixels: int | None) -> Iterator[Image.Image]:
    """
    The picture in ``data`` opened (its header read, nothing decoded) and its size checked; whatever fails,
    here or in the caller's block, is raised as :class:`ImageRejected` with the status that says why.
    """
    if not data:
        raise ImageRejected(422, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # The explicit limit below is lower than Pillow's warning threshold; no warning spam in the logs.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageRejected(
                        413,
                        f"image is {width} x {height} = {width * height:,} pixels, more than the {max_pixels:,} allowed",
                    )
                yield image
    except ImageRejected:
        raise
    except UnidentifiedImageError as error:
        raise ImageRejected(415, f"unsupported media type: {describe_image_error(error)}") from None
    except Image.DecompressionBombError as error:
        raise ImageRejected(413, describe_image_error(error)) from None
    except Exception as error:  # truncated or corrupt data: OSError, SyntaxError, ValueError, EOFError...
        raise ImageRejected(422, f"cannot decode the image: {describe_image_error(error)}") from None


def decode_cost(data: bytes, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> int:
    """
    The memory, in bytes, that decoding the picture in ``data`` and preparing it for the model takes at its
    peak, estimated from the header alone (width x height x the bytes per pixel measured for its Pillow mode).
    Raises :class:`ImageRejected` as :func:`decode_image` does for what is not a usable image.
    """
    with _opened(data, max_pixels) as image:
        width, height = image.size
        return width * height * _DECODE_BYTES_PER_PIXEL.get(image.mode, _MOST_BYTES_PER_PIXEL)


def decode_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """
    Decodes uploaded bytes into an upright RGB image, or raises :class:`ImageRejected` with the status:
    422 for an empty, truncated or corrupt file, 415 for a format Pillow cannot identify (text, PDF, ...),
    413 for more than ``max_pixels`` pixels (checked from the header, before decoding anything).
    """
    with _opened(data, max_pixels) as image:
        return to_rgb(image)  # decodes every pixel now: truncated data fails here, not in a batch


class DecodeBudget:
    """
    The bytes of decoded pictures in flight, shared by all requests. A picture is decoded only once its cost
    (:func:`decode_cost`) is reserved; the reservation ends when its decoding is over. A request that does not
    fit waits; waiters are served first come, first served, so small pictures never overtake a large one
    forever. Used from the event loop's thread only (no locks).

    Args:
        limit_bytes: the most bytes reserved at any time.
    """

    def __init__(self, limit_bytes: int) -> None:
        if limit_bytes < 1:
            raise ValueError(f"the decode budget must be at least 1 byte, got {limit_bytes}")
        self.limit = limit_bytes
        self._in_use = 0
        self._peak = 0
        self._waited = 0
        self._refused = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    @property
    def stats(self) -> dict[str, int]:
        """The limit, the bytes reserved now and at most so far, requests waiting now, that waited, refused."""
        return {
            "decode_budget_bytes": self.limit,
            "decode_bytes_in_use": self._in_use,
            "decode_bytes_peak": self._peak,
            "decode_waiting": len(self._waiters),
            "decode_waited": self._waited,
            "decode_refused": self._refused,
        }

    async def acquire(self, cost: int, timeout: float) -> bool:
        """Reserves ``cost`` bytes; False (and nothing reserved) when they were not free within ``timeout`` s."""
        if cost > self.limit:
            raise ValueError(f"{cost:,} bytes can never fit in a decode budget of {self.limit:,}")
        if not self._waiters and self._in_use + cost <= self.limit:
            self._reserve(cost)
            return True
        self._waited += 1
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((cost, waiter))
        try:
            await asyncio.wait({waiter}, timeout=timeout)
        except asyncio.CancelledError:  # the request was given up while it waited
            if waiter.done():
                self.release(cost)
            else:
                self._leave(cost, waiter)
            raise
        if waiter.done():
            return True
        self._leave(cost, waiter)
        self._refused += 1
        return False

    def release(self, cost: int) -> None:
        """Ends a reservation of ``cost`` bytes, and lets the next waiters in that now fit."""
        self._in_use -= cost
        self._admit()

    def _reserve(self, cost: int) -> None:
        self._in_use += cost
        self._peak = max(self._peak, self._in_use)

    def _leave(self, cost: int, waiter: asyncio.Future) -> None:
        waiter.cancel()
        self._waiters.remove((cost, waiter))
        self._admit()  # the ones behind it may fit now that it no longer holds the line

    def _admit(self) -> None:
        while self._waiters and self._in_use + self._waiters[0][0] <= self.limit:
            cost, waiter = self._waiters.popleft()
            self._reserve(cost)
            waiter.set_result(None)


# --------------------------------------------------------------------------------------------------
# The web application
# --------------------------------------------------------------------------------------------------


class BodyLimits:
    """
    ASGI middleware bounding request bodies in size and in time.

    A body above ``max_bytes`` gets 413: a declared Content-Length is checked before anything is read, and a
    chunked or mis-declared body is counted as it arrives and stopped at the limit, so an endless upload never
    fills memory or disk. A body that is not complete ``timeout_s`` seconds after the request's headers gets
    408, so that stalled uploads do not hold connections and memory forever. Either answer closes the
    connection (the rest of the body is never read); the application is told that the client left, and what
    it answers then is dropped. ``on_reject`` is called for each such answer (the service counts them).
    """

    def __init__(
        self,
        app: Any,
        max_bytes: int,
        timeout_s: float | None = None,
        on_reject: Callable[[], None] | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.on_reject = on_reject

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._answer(scope, receive, send, 413, self.too_large(int(declared)))
            return
        loop = asyncio.get_running_loop()
        deadline = None if self.timeout_s is None else loop.time() + self.timeout_s
        received = 0
        complete = started = answered = False

        async def refuse(status: int, reason: str) -> dict:
            nonlocal answered
            if not started:  # an application that already answered keeps its answer
                await self._answer(scope, receive, send, status, reason)
                answered = True
            return {"type": "http.disconnect"}

        async def limited_receive() -> dict:
            nonlocal received, complete
            if answered:
                return {"type": "http.disconnect"}
            if complete or deadline is None:
                message = await receive()  # after the body only the client's leaving is awaited: no deadline
            else:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                    return await refuse(
                        408, f"the request body did not arrive within {self.timeout_s:g} s; send it at once"
                    )
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    return await refuse(413, self.too_large(received))
                complete = not message.get("more_body", False)
            return message

        async def guarded_send(message: dict) -> None:
            nonlocal started
            if answered:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not answered:
                raise
            # The application's reaction to the client's leaving (ClientDisconnect), after our answer: no error.

    async def _answer(self, scope: dict, receive: Any, send: Any, status: int, reason: str) -> None:
        from starlette.responses import JSONResponse

        if self.on_reject is not None:
            self.on_reject()
        response = JSONResponse({"detail": reason}, status_code=status, headers={"Connection": "close"})
        await response(scope, receive, send)

    def too_large(self, size: int) -> str:
        return f"request body of {size:,} bytes or more is larger than the limit of {self.max_bytes:,} bytes"


def header_deadline_protocol(timeout_s: float) -> type:
    """
    uvicorn's h11 protocol with a deadline on request headers, for ``uvicorn.Config(http=...)``.

    ``BodyLimits`` bounds the time a body takes, but it runs only once the headers are complete: uvicorn has no
    timeout of its own for a connection that sends nothing, or its headers a byte at a time, so such clients
    could hold connections without limit. Here a connection whose request headers are not complete
    ``timeout_s`` seconds after it opened, or after the first byte of its next request, gets 408 and is
    closed. The deadline reads the state of uvicorn's h11 connection (``H11Protocol.conn``); the class refuses
    to start, with a clear message, if a uvicorn release no longer has it (tests/test_serve.py checks this on
    the installed uvicorn).
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    answer = json.dumps({"detail": f"the request headers did not arrive within {timeout_s:g} s"}).encode()
    response = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        + f"content-length: {len(answer)}\r\n\r\n".encode()
        + answer
    )

    class HeaderDeadlineProtocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if not isinstance(getattr(self, "conn", None), h11.Connection):
                raise RuntimeError(
                    "uvicorn's H11Protocol no longer keeps its h11 connection in .conn: the request header "
                    "deadline of show_attend_tell.serve needs updating for this uvicorn release"
                )
            self.header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.start_header_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # a request has begun but its headers are incomplete
                self.start_header_timer()
            else:
                self.stop_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self.stop_header_timer()
            super().connection_lost(exc)

        def start_header_timer(self) -> None:
            if self.header_timer is None:  # a deadline already running is not pushed back
                self.header_timer = asyncio.get_running_loop().call_later(timeout_s, self.headers_too_slow)

        def stop_header_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def headers_too_slow(self) -> None:
            self.header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                logger.warning(
                    "%s: request headers not complete within %g s, connection closed", self.client, timeout_s
                )
                self.transport.write(response)
                self.transport.close()

    return HeaderDeadlineProtocol


#: Retry-After (seconds) of a 503: the queue and the decode budget drain within about a batch's time.
RETRY_AFTER_S = 1


class _Busy(Exception):
    """The service cannot take the request now (503 with Retry-After)."""


_NO_IMAGE = 'no image: send the picture as a multipart file field named "image" (curl -F image=@photo.jpg)'


def _validation_reason(error: dict[str, Any], bounds: dict[str, tuple[int, int]]) -> str:
    """One of FastAPI's validation errors of a /caption field, in the service's words."""
    name = str(error["loc"][-1])
    got = error.get("input")
    if name == "image":
        return _NO_IMAGE
    if name in bounds and error["type"] in ("greater_than_equal", "less_than_equal"):
        low, high = bounds[name]
        return f"{name} must be between {low} and {high}, got {got}"
    if error["type"] == "int_parsing":
        return f"{name} must be an integer, got {got!r}"
    if error["type"] == "bool_parsing":
        return f"{name} must be true or false, got {got!r}"
    return f"{name}: {error['msg']}"


@dataclass(frozen=True)
class _Limits:
    """The service's settings: :func:`create_app`'s keyword arguments."""

    max_upload_bytes: int
    max_image_pixels: int | None
    max_batch_size: int
    max_wait_ms: float
    max_beams: int
    max_new_tokens_limit: int
    max_queue: int
    request_timeout_s: float
    body_timeout_s: float | None
    decode_budget_bytes: int
    decode_threads: int
    decode_wait_s: float


class _Service:
    """
    What the endpoints of one application share, kept on ``app.state.service``: the captioner, the limits, the
    counters, the decode budget and, while the application runs (its lifespan), the batching worker and the
    decoding threads.
    """

    def __init__(self, captioner: Captioner, limits: _Limits) -> None:
        if limits.decode_threads < 1:
            raise ValueError(f"decode_threads must be at least 1, got {limits.decode_threads}")
        self.captioner = captioner
        self.limits = limits
        self.counters = {"received": 0, "rejected": 0}
        self.budget = DecodeBudget(limits.decode_budget_bytes)
        #: The /caption options' bounds, also what a validation error of them reports.
        self.bounds = {"num_beams": (1, limits.max_beams), "max_new_tokens": (1, limits.max_new_tokens_limit)}
        self.default_max_new_tokens = min(captioner.default_max_new_tokens, limits.max_new_tokens_limit)
        self.batcher: BatchingCaptioner | None = None
        self.decoders: concurrent.futures.ThreadPoolExecutor | None = None

    def start(self) -> None:
        """Starts the batching worker and the decoding threads (when the application starts)."""
        limits = self.limits
        self.batcher = BatchingCaptioner(
            self.captioner, limits.max_batch_size, limits.max_wait_ms, limits.max_queue
        )
        self.decoders = concurrent.futures.ThreadPoolExecutor(
            limits.decode_threads, thread_name_prefix="decode"
        )

    async def stop(self) -> None:
        """Stops the decoding threads, then the batching worker once it has finished the queued requests."""
        from starlette.concurrency import run_in_threadpool

        if self.decoders is not None:
            await run_in_threadpool(self.decoders.shutdown)
        if self.batcher is not None:
            await run_in_threadpool(self.batcher.close)

    def count_rejection(self) -> None:
        self.counters["rejected"] += 1

    def reject(self, status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
        """The error answer ``{"detail": reason}``, counted as a rejection."""
        from starlette.responses import JSONResponse

        self.count_rejection()
        return JSONResponse({"detail": reason}, status_code=status, headers=headers)

    def stats(self) -> dict[str, int]:
        return {**self.counters, **(self.batcher.stats if self.batcher else {}), **self.budget.stats}

    def health(self) -> dict[str, Any]:
        limits = self.limits
        return {
            "status": "ok",
            "model": self.captioner.name,
            "device": str(self.captioner.model.device),
            "batching": {
                "max_batch_size": limits.max_batch_size,
                "max_wait_ms": limits.max_wait_ms,
                "max_queue": limits.max_queue,
            },
            "decoding": {
                "threads": limits.decode_threads,
                "budget_bytes": self.budget.limit,
                "wait_s": limits.decode_wait_s,
            },
            "body_timeout_s": limits.body_timeout_s,
            "stats": self.stats(),
        }

    async def prepare(self, data: bytes) -> torch.Tensor:
        """The uploaded picture as model input, decoded once its cost is reserved from the decode budget."""
        from starlette.concurrency import run_in_threadpool

        max_pixels = self.limits.max_image_pixels
        cost = await run_in_threadpool(decode_cost, data, max_pixels)  # reads the header only
        budget = self.budget
        if cost > budget.limit:
            raise ImageRejected(
                413,
                f"decoding this picture takes about {cost / 2**20:,.0f} MiB, more than the decode budget of "
                f"{budget.limit / 2**20:,.0f} MiB",
            )
        if not await budget.acquire(cost, self.limits.decode_wait_s):
            raise _Busy("the server is busy (decoding other pictures); retry shortly")
        loop = asyncio.get_running_loop()
        try:
            decoding = self.decoders.submit(lambda: self.captioner.prepare(decode_image(data, max_pixels)))
        except RuntimeError:  # the service is shutting down
            budget.release(cost)
            raise _Busy("the server is shutting down") from None
        # Released when the decoding thread is done, even if this request is given up before.
        decoding.add_done_callback(lambda _: loop.call_soon_threadsafe(budget.release, cost))
        return await asyncio.wrap_future(decoding)

    async def caption(self, request: Request, image: UploadFile | None, options: CaptionOptions) -> Any:
        """One /caption request: the upload decoded within the budget, captioned by the batcher."""
        from starlette.responses import JSONResponse

        self.counters["received"] += 1
        busy = {"Retry-After": str(RETRY_AFTER_S)}
        try:
            pixel_values = await self.prepare(await _read_upload(request, image))
            future = self.batcher.submit(pixel_values, options)
        except ImageRejected as error:
            return self.reject(error.status, error.reason)
        except _Busy as error:
            return self.reject(503, str(error), busy)
        except queue.Full:
            return self.reject(503, "the server is busy (too many queued requests); retry shortly", busy)
        try:
            result = await asyncio.wait_for(
                asyncio.wrap_future(future), timeout=self.limits.request_timeout_s
            )
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            future.cancel()
            return JSONResponse({"detail": "captioning took too long"}, status_code=504)
        except Exception:  # the batcher logged the traceback; internals are not the client's business
            return JSONResponse({"detail": "captioning failed (see the server log)"}, status_code=500)
        body = result.to_json(self.captioner.grid)
        body.update(num_beams=options.num_beams, max_new_tokens=options.max_new_tokens)
        return body


async def _read_upload(request: Request, image: UploadFile | None) -> bytes:
    """The uploaded picture's bytes: the multipart file field ``image``, else the body of an ``image/*`` request."""
    if image is not None:
        return await image.read()
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        raise ImageRejected(422, _NO_IMAGE)
    if not (content_type.startswith("image/") or content_type == "application/octet-stream"):
        raise ImageRejected(
            415,
            f"unsupported content type {content_type or '(none)'!r}: send multipart/form-data with a "
            'file field named "image", or the image bytes with an image/* content type',
        )
    return await request.body()


def _first_given(*values: Any) -> Any:
    """The first value that is not None: a form field wins over the query parameter, which wins over the default."""
    return next(value for value in values if value is not None)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The batching worker and the decoding threads live as long as the application."""
    service: _Service = app.state.service
    service.start()
    try:
        yield
    finally:
        await service.stop()


async def _invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's answer to a field it could not validate, in the service's words (one line, 422)."""
    service: _Service = request.app.state.service
    return service.reject(
        422, "; ".join(dict.fromkeys(_validation_reason(e, service.bounds) for e in error.errors()))
    )


# The endpoints have no docstrings: FastAPI would publish them as their OpenAPI descriptions.


async def health(request: Request) -> dict[str, Any]:
    return request.app.state.service.health()


async def get_stats(request: Request) -> dict[str, int]:
    return request.app.state.service.stats()


def _caption_answers() -> tuple[type, dict[int | str, dict[str, Any]]]:
    """/caption's answer model and its error answers, as OpenAPI documents them."""
    from pydantic import BaseModel, Field

    class CaptionAnswer(BaseModel):
        caption: str = Field(description="the caption, words joined by spaces")
        tokens: list[str] = Field(description="its words, `<unk>` included")
        num_beams: int
        max_new_tokens: int
        attention: list[list[float]] | None = Field(
            None, description="with return_attention: per token, its h * w attention weights, row-major"
        )
        attention_shape: list[int] | None = Field(None, description="with return_attention: [tokens, h, w]")

    class Problem(BaseModel):
        detail: str = Field(description="what is wrong, in one line")

    errors = {
        408: "the request body did not arrive in time",
        413: "upload, picture or its decoding memory above the limits",
        415: "not an image, or an unsupported content type",
        422: "empty, truncated or corrupt image, or a bad option",
        503: "busy: queue full or decode budget in use (see Retry-After)",
    }
    return CaptionAnswer, {status: {"model": Problem, "description": text} for status, text in errors.items()}


def _add_caption_route(app: FastAPI, service: _Service) -> None:
    """
    Adds ``POST /caption``. Its options' bounds and defaults are this service's, and FastAPI validates and
    documents an endpoint's parameters from its signature, so the endpoint is declared here; the work is
    :meth:`_Service.caption`.
    """
    from fastapi import File, Form, Query

    def option(location: Any, name: str, description: str, **bounds: int) -> Any:
        """One /caption option, as a form field or a query parameter of the same name (the form wins)."""
        return location(None, alias=name, description=description, **bounds)

    max_beams, max_length = service.limits.max_beams, service.limits.max_new_tokens_limit
    default_beams, default_length = service.captioner.default_num_beams, service.default_max_new_tokens
    beams_doc = f"beam width (default {default_beams})"
    length_doc = f"most words generated (default {default_length})"
    attention_doc = "also return each word's attention map (default false)"
    picture = File(None, description="the picture (JPEG, PNG, WebP, ...)")
    answer, problems = _caption_answers()

    @app.post(
        "/caption",
        response_model=answer,
        response_model_exclude_none=True,
        responses=problems,
        summary="Caption one picture",
        description="The picture as a multipart file field `image`, or the raw bytes as the body with an "
        "`image/*` content type. Options as form fields or query parameters.",
    )
    async def caption(
        request: Request,
        image: UploadFile | None = picture,
        form_num_beams: int | None = option(Form, "num_beams", beams_doc, ge=1, le=max_beams),
        form_max_new_tokens: int | None = option(Form, "max_new_tokens", length_doc, ge=1, le=max_length),
        form_return_attention: bool | None = option(Form, "return_attention", attention_doc),
        num_beams: int | None = option(Query, "num_beams", beams_doc, ge=1, le=max_beams),
        max_new_tokens: int | None = option(Query, "max_new_tokens", length_doc, ge=1, le=max_length),
        return_attention: bool | None = option(Query, "return_attention", attention_doc),
    ) -> Any:
        options = CaptionOptions(
            num_beams=_first_given(form_num_beams, num_beams, default_beams),
            max_new_tokens=_first_given(form_max_new_tokens, max_new_tokens, default_length),
            return_attention=bool(_first_given(form_return_attention, return_attention, False)),
        )
        return await service.caption(request, image, options)


def create_app(
    captioner: Captioner,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
    max_beams: int = DEFAULT_MAX_BEAMS,
    max_new_tokens_limit: int = DEFAULT_MAX_NEW_TOKENS_LIMIT,
    max_queue: int = DEFAULT_QUEUE_SIZE,
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    body_timeout_s: float | None = DEFAULT_BODY_TIMEOUT_S,
    decode_budget_bytes: int = DEFAULT_DECODE_BUDGET_BYTES,
    decode_threads: int = DEFAULT_DECODE_THREADS,
    decode_wait_s: float = DEFAULT_DECODE_WAIT_S,
) -> FastAPI:
    """
    The FastAPI application serving ``captioner`` (see the module docstring for the endpoints and limits). The
    batching worker and the decoding threads start with the application (its lifespan) and stop with it, after
    finishing queued requests.
    """
    try:
        from fastapi import FastAPI
        from fastapi.exceptions import RequestValidationError
    except ImportError as error:
        raise ImportError(
            "the HTTP service needs FastAPI and uvicorn: pip install fastapi uvicorn python-multipart"
        ) from error

    limits = _Limits(
        max_upload_bytes=max_upload_bytes,
        max_image_pixels=max_image_pixels,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        max_beams=max_beams,
        max_new_tokens_limit=max_new_tokens_limit,
        max_queue=max_queue,
        request_timeout_s=request_timeout_s,
        body_timeout_s=body_timeout_s,
        decode_budget_bytes=decode_budget_bytes,
        decode_threads=decode_threads,
        decode_wait_s=decode_wait_s,
    )
    service = _Service(captioner, limits)
    app = FastAPI(
        title="Show, Attend and Tell captioning",
        description="Caption an image: POST it to /caption as a multipart file field named `image`.",
        lifespan=_lifespan,
    )
    app.state.service = service
    app.add_middleware(
        BodyLimits, max_bytes=max_upload_bytes, timeout_s=body_timeout_s, on_reject=service.count_rejection
    )
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/stats", get_stats, methods=["GET"])
    _add_caption_route(app, service)
    return app


# --------------------------------------------------------------------------------------------------
# Text to images over a caption index: GET /search
# --------------------------------------------------------------------------------------------------

DEFAULT_MAX_SEARCH_TOP_K = 100


def add_search_route(app: FastAPI, retriever: Any, *, max_top_k: int = DEFAULT_MAX_SEARCH_TOP_K) -> None:
    """
    Adds ``GET /search?q=...&top_k=...`` to ``app``: ``retriever`` (a
    :class:`~show_attend_tell.retrieval.IndexedRetriever`) answers each query in a worker thread. Any query
    text is accepted; one that cannot match gets ``hits: []`` and a ``reason``; a damaged index gets 503.
    """
    from fastapi import Query
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    from .caption_index import CaptionIndexError

    @app.get("/search")
    async def search(
        q: str = Query(..., description="what the pictures should show, in words"),
        top_k: int = Query(5, ge=1, le=max_top_k, description=f"pictures to return (1 to {max_top_k})"),
    ) -> Any:
        try:
            result = await run_in_threadpool(retriever.search, q, top_k, False)
        except CaptionIndexError as error:
            return JSONResponse({"detail": str(error)}, status_code=503)
        return {
            "query": result.query,
            "hits": [
                {"rank": hit.rank, "score": hit.score, "image": hit.image_id, "captions": list(hit.captions)}
                for hit in result.hits
            ],
            "unknown_words": result.unknown_words,
            "reason": result.reason,
            "candidates": result.candidates,
        }


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """The service's batching and its limits on requests, pictures and memory."""
    parser.add_argument(
        "--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE, help="requests per batch"
    )
    parser.add_argument(
        "--max-wait-ms", type=float, default=DEFAULT_MAX_WAIT_MS, help="how long a batch waits to fill"
    )
    parser.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULT_MAX_UPLOAD_BYTES / 2**20,
        help="request size limit (MiB)",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help="largest image (width x height)",
    )
    parser.add_argument("--max-beams", type=int, default=DEFAULT_MAX_BEAMS, help="largest num_beams accepted")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS_LIMIT,
        help="largest max_new_tokens accepted",
    )
    parser.add_argument(
        "--queue-size",
        type=int,
        default=DEFAULT_QUEUE_SIZE,
        help="requests waiting for the model beyond which the service answers 503 (each holds its picture's "
        f"model input, 0.75 MiB at 256 px; default {DEFAULT_QUEUE_SIZE})",
    )
    parser.add_argument(
        "--decode-budget-mb",
        type=float,
        default=DEFAULT_DECODE_BUDGET_BYTES / 2**20,
        help="memory (MiB) that the pictures being decoded may take together, estimated from each header as "
        "width x height x 24 bytes (8-bit), 28 (with transparency) or 40 (16-bit); a picture waits for its "
        f"share up to {DEFAULT_DECODE_WAIT_S:g} s, then gets 503, and one that alone needs more gets 413 "
        f"(default {DEFAULT_DECODE_BUDGET_BYTES / 2**20:g}: one picture of the default --max-image-pixels in any mode)",
    )
    parser.add_argument(
        "--decode-threads",
        type=int,
        default=DEFAULT_DECODE_THREADS,
        help="pictures decoded at once (default: the number of CPU cores, at most 4)",
    )
    parser.add_argument(
        "--body-timeout",
        type=float,
        default=DEFAULT_BODY_TIMEOUT_S,
        help="seconds a client has to send a whole request body; a slower or stalled one gets 408 and the "
        f"connection is closed (default {DEFAULT_BODY_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=DEFAULT_HEADER_TIMEOUT_S,
        help="seconds a client has to send a request's headers, from the connection's opening or the first "
        f"byte of its next request; a slower one gets 408 and the connection is closed (default "
        f"{DEFAULT_HEADER_TIMEOUT_S:g})",
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from .hub import add_trust_remote_code_argument

    parser = argparse.ArgumentParser(
        prog="python -m show_attend_tell.serve", description="Serve a captioning model over HTTP."
    )
    parser.add_argument("--model", required=True, help="model folder (safetensors weights)")
    add_trust_remote_code_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    add_device_argument(parser)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    _add_limit_arguments(parser)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    parser.add_argument(
        "--index",
        help="a caption index (scripts/search_images.py build) built with this model: serves GET /search",
    )
    args = parser.parse_args(argv)
    for name in (
        "max_batch_size",
        "max_beams",
        "max_new_tokens",
        "max_image_pixels",
        "queue_size",
        "decode_threads",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_upload_mb <= 0 or args.max_wait_ms < 0 or not 0 <= args.port <= 65535:
        parser.error("--max-upload-mb must be positive, --max-wait-ms 0 or more, --port 0 to 65535")
    if not (args.decode_budget_mb > 0 and args.body_timeout > 0 and args.header_timeout > 0):
        parser.error("--decode-budget-mb, --body-timeout and --header-timeout must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        print(
            "the HTTP service needs FastAPI and uvicorn: pip install fastapi uvicorn python-multipart",
            file=sys.stderr,
        )
        return 2
    from transformers.utils import logging as transformers_logging

    from .hub import UnsafeWeightsError

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = pick_device(args.device)
    except ValueError as error:
        print(f"--device {error}", file=sys.stderr)
        return 2
    try:
        captioner = Captioner.from_pretrained(
            args.model,
            device=device,
            dtype=getattr(torch, args.dtype),
            trust_remote_code=args.trust_remote_code,
        )
    except (OSError, UnsafeWeightsError, ValueError) as error:
        print(f"cannot load the model from {args.model}: {one_line(error)}", file=sys.stderr)
        return 2
    app = create_app(
        captioner,
        max_upload_bytes=math.ceil(args.max_upload_mb * 2**20),
        max_image_pixels=args.max_image_pixels,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_beams=args.max_beams,
        max_new_tokens_limit=args.max_new_tokens,
        max_queue=args.queue_size,
        body_timeout_s=args.body_timeout,
        decode_budget_bytes=math.ceil(args.decode_budget_mb * 2**20),
        decode_threads=args.decode_threads,
    )
    if args.index:
        from .caption_index import CaptionIndexError
        from .retrieval import IndexedRetriever

        try:
            add_search_route(app, IndexedRetriever(captioner.model, captioner.processor, args.index))
        except CaptionIndexError as error:
            print(f"cannot serve the caption index: {error}", file=sys.stderr)
            return 2
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        http=header_deadline_protocol(args.header_timeout),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
