"""An HTTP captioning service: `python -m show_attend_tell.serve --model DIR --port 8000`.

Endpoints:

* ``POST /caption``: the picture as a multipart file field named ``image`` (or the raw bytes as the
  request body with an ``image/*`` content type). Options as form fields or query parameters:
  ``num_beams`` (default: the model's generation config), ``max_new_tokens`` (idem) and
  ``return_attention`` (false). Answers ``{"caption", "tokens", "num_beams", "max_new_tokens"}`` plus,
  with ``return_attention``, ``attention`` (one map of ``h * w`` weights per token, row-major) and
  ``attention_shape`` (``[tokens, h, w]``).
* ``GET /health``: ``{"status": "ok", "model", "device", "batching", "stats"}``.
* ``GET /stats``: the counters alone (requests, batches, largest batch, errors).

Errors are JSON ``{"detail": "..."}`` with a reason a person can act on: 413 for a request above the
upload limit or an image with more pixels than allowed, 415 for a file that is not an image Pillow can
read, 422 for an empty, truncated or corrupt image or a bad option, 503 when the queue is full.

Batching: requests are decoded concurrently, then queued for one background thread that owns the model.
It takes the first waiting request, keeps collecting for up to ``max_wait_ms`` or until
``max_batch_size`` requests are waiting, and captions each group of requests with the same options with
one ``generate()`` call. Under load the model thus sees batches (several times the throughput on a GPU);
a lone request waits at most ``max_wait_ms``. Every image is processed on its own by the image processor
and the search keeps each image's beams apart, so a request gets the same caption batched or alone.

FastAPI and uvicorn are an optional extra (``pip install "show-attend-tell[serve]"``); the
:class:`Captioner` and :class:`BatchingCaptioner` classes work without them.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import io
import logging
import math
import queue
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .image_processing_show_attend_tell import describe_image_error, to_rgb
from .pipeline_show_attend_tell import words_and_attention

try:  # at module level because FastAPI resolves the endpoints' string annotations in this namespace
    from starlette.requests import Request
except ImportError:  # the optional [serve] extra is missing: only create_app needs it, and says so
    Request = Any

if TYPE_CHECKING:
    from fastapi import FastAPI

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
        cls, model_dir: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> Captioner:
        """Loads a model folder (safetensors only) onto ``device`` (default: CUDA when available)."""
        from .hub import load_model_and_processor

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, processor = load_model_and_processor(model_dir, device=device, dtype=dtype)
        return cls(model, processor)

    def caption_batch(self, images: Sequence[Image.Image], options: CaptionOptions) -> list[CaptionResult]:
        """One generate() call for all ``images`` (RGB PIL images) with the same options; one result per image."""
        pixel_values = self.processor.image_processor(list(images), return_tensors="pt")["pixel_values"]
        pixel_values = pixel_values.to(self.model.device, dtype=self.model.dtype)
        with torch.inference_mode():
            outputs = self.model.generate(
                pixel_values=pixel_values,
                num_beams=options.num_beams,
                max_new_tokens=options.max_new_tokens,
                num_return_sequences=1,
                output_attentions=options.return_attention,
                return_dict_in_generate=True,
            )
        maps = outputs.get("attention_maps") if options.return_attention else None
        tokenizer = self.processor.tokenizer
        results = []
        for row, sequence in enumerate(outputs.sequences):
            words, attention = words_and_attention(sequence, None if maps is None else maps[row], tokenizer)
            caption = tokenizer.decode(sequence, skip_special_tokens=True)
            results.append(CaptionResult(caption=caption, tokens=words, attention=attention))
        return results


@dataclass
class _Job:
    image: Image.Image
    options: CaptionOptions
    future: concurrent.futures.Future


_STOP = object()


class BatchingCaptioner:
    """
    Collects captioning requests from many threads and runs them in batches on one worker thread.

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
        """``requests`` captioned or failed, ``batches`` (generate() calls), ``largest_batch``, ``failed``."""
        with self._lock:
            return dict(self._stats)

    def submit(self, image: Image.Image, options: CaptionOptions) -> concurrent.futures.Future:
        """Queues one image; the future's result is its :class:`CaptionResult`."""
        if not self._thread.is_alive():
            raise RuntimeError("the batcher is closed")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put_nowait(_Job(image, options, future))
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
            results = self.captioner.caption_batch([job.image for job in group], options)
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


def decode_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """
    Decodes uploaded bytes into an upright RGB image, or raises :class:`ImageRejected` with the status:
    422 for an empty, truncated or corrupt file, 415 for a format Pillow cannot identify (text, PDF, ...),
    413 for more than ``max_pixels`` pixels (checked from the header, before decoding anything).
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
                return to_rgb(image)  # decodes every pixel now: truncated data fails here, not in a batch
    except ImageRejected:
        raise
    except UnidentifiedImageError as error:
        raise ImageRejected(415, f"unsupported media type: {describe_image_error(error)}") from None
    except Image.DecompressionBombError as error:
        raise ImageRejected(413, describe_image_error(error)) from None
    except Exception as error:  # truncated or corrupt data: OSError, SyntaxError, ValueError, EOFError...
        raise ImageRejected(422, f"cannot decode the image: {describe_image_error(error)}") from None


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _parse_int(name: str, value: str | None, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ImageRejected(422, f"{name} must be an integer, got {value!r}") from None
    if not low <= number <= high:
        raise ImageRejected(422, f"{name} must be between {low} and {high}, got {number}")
    return number


def _parse_bool(name: str, value: str | None) -> bool:
    if value is None:
        return False
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ImageRejected(422, f"{name} must be true or false, got {value!r}")


# --------------------------------------------------------------------------------------------------
# The web application
# --------------------------------------------------------------------------------------------------


class RequestTooLarge(Exception):
    """Raised while reading a request body that grows past the limit (no or a false Content-Length)."""


class BodySizeLimit:
    """
    ASGI middleware: refuses bodies above ``max_bytes`` with 413. A declared Content-Length is checked
    before anything is read; a chunked or mis-declared body is counted as it arrives and stopped at the
    limit, so an endless upload never fills memory or disk.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            from starlette.responses import JSONResponse

            response = JSONResponse({"detail": self.message(int(declared))}, status_code=413)
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise RequestTooLarge(self.message(received))
            return message

        await self.app(scope, counting_receive, send)

    def message(self, size: int) -> str:
        return f"request body of {size:,} bytes or more is larger than the limit of {self.max_bytes:,} bytes"


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
) -> FastAPI:
    """
    The FastAPI application serving ``captioner`` (see the module docstring for the endpoints). The batching
    worker starts with the application (its lifespan) and stops with it, after finishing queued requests.
    """
    import contextlib

    try:
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse
    except ImportError as error:
        raise ImportError(
            'the HTTP service needs FastAPI and uvicorn: pip install "show-attend-tell[serve]"'
        ) from error
    from starlette.concurrency import run_in_threadpool

    counters = {"received": 0, "rejected": 0}
    state: dict[str, BatchingCaptioner] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        state["batcher"] = BatchingCaptioner(captioner, max_batch_size, max_wait_ms, max_queue)
        try:
            yield
        finally:
            await run_in_threadpool(state["batcher"].close)

    app = FastAPI(
        title="Show, Attend and Tell captioning",
        description="Caption an image: POST it to /caption as a multipart file field named `image`.",
        lifespan=lifespan,
    )
    app.add_middleware(BodySizeLimit, max_bytes=max_upload_bytes)

    def reject(status: int, reason: str) -> JSONResponse:
        counters["rejected"] += 1
        return JSONResponse({"detail": reason}, status_code=status)

    @app.exception_handler(RequestTooLarge)
    async def too_large(_: Request, error: RequestTooLarge) -> JSONResponse:
        return reject(413, str(error))

    def stats() -> dict[str, int]:
        batcher = state.get("batcher")
        return {**counters, **(batcher.stats if batcher else {})}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": captioner.name,
            "device": str(captioner.model.device),
            "batching": {"max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms},
            "stats": stats(),
        }

    @app.get("/stats")
    async def get_stats() -> dict[str, int]:
        return stats()

    @app.post("/caption")
    async def caption(request: Request) -> JSONResponse:
        counters["received"] += 1
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        fields: dict[str, str] = dict(request.query_params)
        if content_type == "multipart/form-data":
            try:
                form = await request.form(max_files=1, max_fields=16)
            except RequestTooLarge:  # answered with 413 by the exception handler above
                raise
            except Exception as error:  # a malformed multipart body, or more than one file
                return reject(422, f"cannot read the multipart form: {' '.join(str(error).split())}")
            upload = form.get("image")
            fields.update({key: value for key, value in form.items() if isinstance(value, str)})
            if upload is None or isinstance(upload, str):
                return reject(
                    422,
                    'no image: send the picture as a multipart file field named "image" (curl -F image=@photo.jpg)',
                )
            data = await upload.read()
        elif content_type.startswith("image/") or content_type == "application/octet-stream":
            data = await request.body()
        else:
            return reject(
                415,
                f"unsupported content type {content_type or '(none)'!r}: send multipart/form-data with a file "
                'field named "image", or the image bytes with an image/* content type',
            )
        try:
            options = CaptionOptions(
                num_beams=_parse_int(
                    "num_beams", fields.get("num_beams"), captioner.default_num_beams, 1, max_beams
                ),
                max_new_tokens=_parse_int(
                    "max_new_tokens",
                    fields.get("max_new_tokens"),
                    min(captioner.default_max_new_tokens, max_new_tokens_limit),
                    1,
                    max_new_tokens_limit,
                ),
                return_attention=_parse_bool("return_attention", fields.get("return_attention")),
            )
            image = await run_in_threadpool(decode_image, data, max_image_pixels)
        except ImageRejected as error:
            return reject(error.status, error.reason)
        try:
            future = state["batcher"].submit(image, options)
        except queue.Full:
            return reject(503, "the server is busy (too many queued requests); retry shortly")
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(future), timeout=request_timeout_s)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            future.cancel()
            return JSONResponse({"detail": "captioning took too long"}, status_code=504)
        except Exception:  # the batcher logged the traceback; internals are not the client's business
            return JSONResponse({"detail": "captioning failed (see the server log)"}, status_code=500)
        body = result.to_json(captioner.grid)
        body.update(num_beams=options.num_beams, max_new_tokens=options.max_new_tokens)
        return JSONResponse(body)

    return app


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m show_attend_tell.serve", description="Serve a captioning model over HTTP."
    )
    parser.add_argument("--model", required=True, help="model folder (safetensors weights)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)"
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
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
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    args = parser.parse_args(argv)
    for name in ("max_batch_size", "max_beams", "max_new_tokens", "max_image_pixels"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_upload_mb <= 0 or args.max_wait_ms < 0 or not 0 <= args.port <= 65535:
        parser.error("--max-upload-mb must be positive, --max-wait-ms 0 or more, --port 0 to 65535")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        print(
            'the HTTP service needs FastAPI and uvicorn: pip install "show-attend-tell[serve]"',
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
        captioner = Captioner.from_pretrained(
            args.model, device=args.device, dtype=getattr(torch, args.dtype)
        )
    except (OSError, UnsafeWeightsError, ValueError) as error:
        print(f"cannot load the model from {args.model}: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    app = create_app(
        captioner,
        max_upload_bytes=math.ceil(args.max_upload_mb * 2**20),
        max_image_pixels=args.max_image_pixels,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_beams=args.max_beams,
        max_new_tokens_limit=args.max_new_tokens,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
