"""A real-time scoring endpoint: the Open Inference Protocol (v2, KServe's and Triton's) and TorchServe's shape.

Endpoints, for the model named NAME (default: the model directory's folder name):

- ``GET /v2/health/live``, ``/v2/health/ready``, ``/v2/models/NAME/ready``: 200 once the model is loaded.
- ``GET /v2``, ``/v2/models/NAME``: server and model metadata (the input ``images``, BYTES ``[-1]``: encoded
  image files; the output ``probabilities``, FP32 ``[-1, C]``; labels, image size and architecture).
- ``POST /v2/models/NAME/infer``: the images as a BYTES input of shape ``[N]``, base64 strings in JSON or
  raw bytes in the binary-data extension that Triton's clients send. The answer holds ``probabilities``
  (FP32 ``[N, C]``); asked for with the classification extension (``"parameters": {"classification": k}``
  on the output), the top k as BYTES ``"probability:index:label"``; binary when asked (``binary_data``).
  The request is checked whole, every field, before any image is decoded (400 naming the field).
- ``POST /predictions/NAME``: one raw image as the body (``Content-Type: image/*``), or multipart form data
  with files in field ``data``: JSON with each image's label and per-class probabilities.

Bad requests get a 4xx with ``{"error": ...}`` and the server goes on: not an image, truncated, empty, a
decompression bomb or a format imgtrain does not read (400), over the size limit or the memory
decoding may hold (413), a body that does not arrive in time (408), a content type it does not take (415),
an unknown model (404). Request bodies, and decoding, hold memory from budgets of bytes that requests
take whole and in turn (deploy/budget.py): a body that finds no room within a second gets 503 (Retry-After),
unread. Concurrent requests are batched (deploy/batching.py); a full queue answers 503. Connections are
counted and their requests' headers timed (deploy/connections.py). SIGTERM (and Ctrl-C) stop taking
connections and let the requests in flight finish.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import struct
import sys
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from imgtrain.errors import (
    BadImageError,
    MissingDependencyError,
    check_choice,
    check_range,
    option,
)

INPUT, OUTPUT = "images", "probabilities"
BINARY_HEADER = "Inference-Header-Content-Length"
BODY_COUNTS = 3  # what a body holds, in its sizes: its bytes, what parsing makes of them, its images cut out
_MB = 2**20
_TRIM_AFTER = 16 * _MB  # decoding that held more gives what it freed back to the kernel (a 2-megapixel PNG)
_TRIM_BODIES_AFTER = 64 * _MB  # bodies that held more at once (as counted) give it back once they are all answered
BODY_PATIENCE_S = 1.0  # how long a body waits for room in --max-bodies-mb before its request gets 503


@dataclass
class ServeOptions:
    """How the endpoint batches, queues and limits requests."""

    max_batch_size: int = 16  # images run through the network together, at most
    max_wait_ms: float = 5.0  # how long a batch waits for requests still being decoded
    max_queue: int = 256  # images waiting, at most; beyond, 503
    max_body_mb: float = 20.0  # a request body larger than this gets 413
    max_bodies_mb: float | None = None  # memory request bodies may hold at once, each counted 3x its size (one
    # that does not fit within a second gets 503); None: 256, or room for one body of max_body_mb where that takes more
    body_timeout_s: float = 60.0  # a body not all there by then gets 408
    header_timeout_s: float = 5.0  # a connection whose request's headers are not all there by then is closed
    max_connections: int = 512  # connections open at once; beyond, 503 as they are accepted (deploy/connections.py)
    max_decode_mb: float = 512.0  # memory decoding requests' images may hold at once (more wait; over it alone: 413)
    threads: int | str | None = None  # torch's CPU threads, as for training and scoring
    precision: str = "auto"  # bf16 on a GPU and where the CPU runs it natively, else fp32 (fp16 on older GPUs)
    device: str = "auto"  # the first CUDA GPU where there is one, else the CPU
    engine: str | None = None  # torch, onnxruntime, openvino or auto (deploy/engines.py); None: torch for a model
    # directory, auto for an export

    @property
    def bodies_mb(self) -> float:
        """``max_bodies_mb``, or its default."""
        return max(256.0, BODY_COUNTS * self.max_body_mb) if self.max_bodies_mb is None else self.max_bodies_mb

    def check(self) -> None:
        from imgtrain.deploy.engines import ENGINES
        from imgtrain.device import resolve_device
        from imgtrain.precision import PRECISIONS

        check_choice("precision", self.precision, PRECISIONS)
        if self.engine is not None:
            check_choice("engine", self.engine, ENGINES)
        resolve_device(self.device)  # cuda without a GPU is named now, before anything loads
        check_range("max_batch_size", self.max_batch_size, low=1, high=4096)
        check_range("max_wait_ms", self.max_wait_ms, low=0, high=10_000)
        check_range("max_queue", self.max_queue, low=1)
        check_range("max_body_mb", self.max_body_mb, low=0, low_inclusive=False)
        check_range("max_bodies_mb", self.bodies_mb, low=BODY_COUNTS * self.max_body_mb,
                    hint=f"a body of {option('max_body_mb', f'{self.max_body_mb:g}')} counts {BODY_COUNTS} times its "
                         "size: pass at least that")
        check_range("body_timeout_s", self.body_timeout_s, low=0, low_inclusive=False)
        check_range("header_timeout_s", self.header_timeout_s, low=0, low_inclusive=False)
        check_range("max_connections", self.max_connections, low=1)
        check_range("max_decode_mb", self.max_decode_mb, low=0, low_inclusive=False)


class RequestError(Exception):
    """A request the server refuses: its HTTP status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _imports():
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise MissingDependencyError("`imgtrain serve` needs starlette and uvicorn",
                                     "install them with `pip install 'imgtrain[serve]'`") from None


class Endpoint:
    """The model, ready to answer: decoding, preparation and the batched network.

    The model is loaded, and every torch operation runs, in the batching thread (deploy/batching.py
    says why); the threads that decode requests use Pillow and numpy."""

    def __init__(self, trained_model: Path | str, name: str, options: ServeOptions,
                 log: Callable[[str], None]) -> None:
        from imgtrain.deploy.batching import Batcher
        from imgtrain.deploy.budget import Budget
        from imgtrain.threads import Threads, parse_threads

        self.name, self.options, self.log = name, options, log
        self.bodies = Budget(int(options.bodies_mb * _MB), drained=self._bodies_drained)
        self._trimming = None
        self.decoding = Budget(int(options.max_decode_mb * _MB))
        self.threads = Threads(parse_threads(options.threads), log)
        self.batcher = Batcher(lambda: self._start(trained_model), max_batch=options.max_batch_size,
                               max_wait_ms=options.max_wait_ms, max_queue=options.max_queue)

    def _bodies_drained(self, peak: int) -> None:
        """In the event loop, when the last body held is let go: after a burst, the memory the bodies left free
        goes back to the kernel, in a thread. malloc keeps freed blocks for reuse (allocator.py), among blocks
        still in use: forms of a 19 MB image from 40 clients at once, read 4 at a time, left a server 300 MB
        larger for good. Not after each request: the trim walks every arena (30 ms for 570 MB), and the next
        batch faults its memory in anew."""
        if peak < _TRIM_BODIES_AFTER or self._trimming is not None:
            return
        from imgtrain.allocator import give_back_free_memory

        self._trimming = asyncio.get_running_loop().run_in_executor(None, give_back_free_memory)
        self._trimming.add_done_callback(lambda _: setattr(self, "_trimming", None))

    def _start(self, trained_model: Path | str) -> Callable[[list], np.ndarray]:
        """In the batching thread: load the model and return what runs a batch through it."""
        from imgtrain.allocator import reuse_large_blocks
        from imgtrain.deploy.engines import device_for, load_engine, open_model

        # First, before this thread's OpenMP workers exist: they inherit the flag, which is per thread.
        torch.set_flush_denormal(True)
        self.threads.__enter__()
        self.model = model = open_model(trained_model)
        self.labels = list(model.labels)
        self.preparation = preparation = model.preparation
        device = device_for(self.options.device, self.options.engine, model)
        if device.type == "cpu":
            reuse_large_blocks()  # each batch's activations from reused memory, not fresh pages (allocator.py)
        forward = load_engine(self.options.engine, model, device=device, precision=self.options.precision,
                              threads=self.threads.current, batch_size=self.options.max_batch_size, log=self.log)
        self.describe = (f"{model.architecture}, {len(self.labels)} classes, {model.image_size} px, on "
                         f"{device}, engine {forward.describe()}, {self.threads.describe()}")

        def run(images: list) -> np.ndarray:
            if preparation.plain:  # N x S x S x 3 arrays: a channels-last N x 3 x S x S view
                return forward(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))
            return forward(torch.stack([preparation(image) for image in images]))  # pictures, for the operations

        # One image through it before the server says it is ready: the first call sets up the kernels (on a
        # GPU, CUDA's libraries: a second or more), which the first client would otherwise wait for.
        forward(torch.zeros((1, 3, model.image_size, model.image_size), dtype=torch.uint8))
        return run

    def close(self) -> None:
        """Answer what is queued, then stop the batching thread."""
        self.batcher.stop()

    def metadata(self) -> dict:
        return {"name": self.name, "versions": ["1"], "platform": "pytorch_imgtrain",
                "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
                "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(self.labels)]}],
                "parameters": {"labels": self.labels, "image_size": self.model.image_size,
                               "architecture": self.model.architecture,
                               "content": "encoded image files (JPEG, PNG, ...), one per element"}}

    def _open(self, blobs: list[bytes], names: list[str]) -> tuple[list, int]:
        """In a worker thread: each image opened from its header and checked (400 naming the first refused), and
        what decoding them holds at once. They are decoded one after another, and each leaves its resized pixels
        (for a model with a transformation, its picture) until the request is answered: at most, one decode
        beside what those before it left. An image alone always fits in --max-decode-mb, or it is refused."""
        from imgtrain.data.decode import open_sent

        draft, plain = self.preparation.draft_size, self.preparation.plain
        pixels = 3 * self.model.image_size ** 2 if plain else 0
        opened, need, kept = [], 0, 0
        for blob, name in zip(blobs, names, strict=True):
            try:
                image = open_sent(blob, name, draft, self.decoding.limit - pixels)
            except BadImageError as exc:
                raise RequestError(400, f"{name}: {exc.reason}") from None
            need, kept = max(need, kept + image.peak + pixels), kept + (pixels or image.picture)
            opened.append(image)
        return opened, need

    def _decode(self, opened: list, names: list[str], need: int) -> list:
        """In a worker thread, with Pillow and numpy only: each image decoded, and prepared where no
        transformation asks for torch."""
        images = []
        for image, name in zip(opened, names, strict=True):
            try:
                picture = image.rgb()
            except BadImageError as exc:
                raise RequestError(400, f"{name}: {exc.reason}") from None
            images.append(self.preparation.pixels(picture) if self.preparation.plain else picture)
            del picture
        if need >= _TRIM_AFTER:
            from imgtrain.allocator import give_back_free_memory

            give_back_free_memory()  # this thread's arena would keep what it freed (allocator.py)
        return images

    async def probabilities(self, blobs: list[bytes], names: list[str],
                            gone: Callable[[], Awaitable[bool]] | None = None) -> np.ndarray:
        """Each image's class probabilities: opened and decoded in worker threads, within --max-decode-mb, then
        batched with other requests'. ``gone``: whether the client has gone (its images are then not decoded)."""
        from starlette.concurrency import run_in_threadpool

        from imgtrain.deploy.batching import QueueFullError

        limit = self.options.max_queue
        _check_count(len(blobs), limit)
        try:
            self.batcher.reserve(len(blobs))
        except QueueFullError:
            raise RequestError(503, f"the server is busy: {self.batcher.pending} images are in hand, and it holds "
                                    f"{limit}; retry later") from None
        try:
            opened, need = await run_in_threadpool(self._open, blobs, names)
            if need > self.decoding.limit:
                raise RequestError(413, f"the {len(blobs)} images take {need / _MB:,.0f} MB to decode, over the "
                                        f"{self.decoding.limit / _MB:,.0f} MB the server decodes at once: send fewer "
                                        "in a request")
            await _still_there(gone)
            async with self.decoding.hold(need):  # until the images are answered
                await _still_there(gone)  # it may have waited: the client may have given up
                self.batcher.coming(+1)
                try:
                    images = await run_in_threadpool(self._decode, opened, names, need)
                finally:
                    self.batcher.coming(-1)
                return await self.batcher(images)
        finally:
            self.batcher.release(len(blobs))


async def _still_there(gone: Callable[[], Awaitable[bool]] | None) -> None:
    """Nothing is decoded for a client that has gone (its answer would go nowhere)."""
    if gone is not None and await gone():
        raise RequestError(499, "the client closed the connection")


@asynccontextmanager
async def _receiving(request, options: ServeOptions, bodies):
    """The request's body: refused with 413 past --max-body-mb (by its Content-Length, or as it streams), held
    in ``bodies`` (--max-bodies-mb) until the block ends, and refused with 408 when it is not all there within
    --body-timeout-s of its turn. A body that finds no room within a second (BODY_PATIENCE_S: bodies ahead of it
    that come fast are done by then) gets 503 before any of it is read, with Retry-After: the client may go to
    another server or come back, where in a line without end it waited unanswered for as long as the bodies
    ahead took. What it sends meanwhile is read and dropped (deploy/connections.py: it then reads its answer)."""
    from starlette.requests import ClientDisconnect

    from imgtrain.deploy.budget import BudgetFullError

    limit = int(options.max_body_mb * _MB)
    declared = request.headers.get("content-length")
    size = int(declared) if declared is not None and declared.isdigit() else None
    if size is not None and size > limit:
        raise RequestError(413, f"the body is {size:,} bytes, over the limit of {limit:,}")
    try:
        async with bodies.hold(BODY_COUNTS * (limit if size is None else size), patience=BODY_PATIENCE_S):
            chunks, received = [], 0
            try:
                async with asyncio.timeout(options.body_timeout_s):
                    async for chunk in request.stream():
                        received += len(chunk)
                        if received > limit:
                            raise RequestError(413, f"the body is over the limit of {limit:,} bytes")
                        chunks.append(chunk)
            except TimeoutError:
                raise RequestError(408, f"the body did not arrive within {options.body_timeout_s:g} s (it had "
                                        f"{received:,} bytes of it): send it faster (the server's --body-timeout-s)") \
                    from None
            except ClientDisconnect:  # its answer would go nowhere
                raise RequestError(499, "the client closed the connection before its body was sent") from None
            body = b"".join(chunks)
            del chunks
            yield body
    except BudgetFullError:  # only as it waits for room, before the body is read
        raise RequestError(503, f"the server is busy: the request bodies it holds take {bodies.held / _MB:,.0f} MB "
                                f"of its {bodies.limit / _MB:,.0f} MB (--max-bodies-mb, each counted at 3 times its "
                                "size): retry in a second") from None


async def _form_files(request, body: bytes, max_images: int) -> tuple[list[bytes], list[str]]:
    """The files of a multipart form's field 'data', and their names: 400 for a form that cannot be read, 413 for
    more files than the server holds (the parser stops counting one past that)."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def again():  # the body, read within the limit, for the form parser
        yield body
        yield b""

    try:
        form = await MultiPartParser(request.headers, again(), max_files=max_images + 1, max_fields=100).parse()
    except MultiPartException as exc:
        if exc.message.startswith("Too many files"):
            raise _too_many(f"over {max_images + 1}", max_images) from None
        raise RequestError(400, f"the multipart form cannot be read ({exc.message})") from None
    except Exception as exc:  # a malformed form is the client's
        raise RequestError(400, f"the multipart form cannot be read ({exc})") from None
    files = [f for f in form.getlist("data") if hasattr(f, "read")]
    if not files:
        raise RequestError(400, "the form has no file in field 'data'")
    return [await f.read() for f in files], [f.filename or f"image {i}" for i, f in enumerate(files)]


def _content_type(request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


# --- The Open Inference Protocol --------------------------------------------------------------------
#
# The whole request is checked before any image is decoded or scored: its structure, each field's type,
# the one input and its shape, the outputs asked for and the binary data. A request that fails any check
# gets 400 with one line naming the field (413 for more images than the server holds), and costs no decoding.

_KINDS = {dict: "an object", list: "a list", str: "a string", int: "an integer", bool: "true or false"}


@dataclass
class _Output:
    """An output asked for: the probabilities, or with ``top`` > 0 the top k (the classification extension)."""

    top: int
    binary: bool


@dataclass
class _InferRequest:
    id: str | None
    images: list[bytes]
    outputs: list[_Output]


def _shown(value) -> str:
    """A value in a one-line message: containers by their kind (they may be large or deep), others as JSON."""
    if isinstance(value, dict | list):
        return _KINDS[type(value)]
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _field(container: dict, key: str, kind: type, where: str, default=None):
    """``container[key]`` (``default`` when absent or null), refused with 400 unless of ``kind``."""
    value = container.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RequestError(400, f"{where} is {_shown(value)}: it must be {_KINDS[kind]}")
    return value


def _check_count(count: int, limit: int) -> None:
    """A request's image count, refused before anything is decoded: none (400), or more than the server holds."""
    if count < 1:
        raise RequestError(400, "no image in the request")
    if count > limit:
        raise _too_many(str(count), limit)


def _too_many(count: str, limit: int) -> RequestError:
    return RequestError(413, f"{count} images in one request, more than the server holds at once ({limit}): send at "
                             f"most {limit} a request")


def _outputs(request: dict, classes: int) -> list[_Output]:
    """The outputs asked for (all of them, the probabilities, when none are named), checked."""
    parameters = _field(request, "parameters", dict, "parameters", {})
    binary_default = _field(parameters, "binary_data_output", bool, "parameters.binary_data_output", False)
    asked = _field(request, "outputs", list, "outputs") or [{"name": OUTPUT}]
    outputs = []
    for i, wanted in enumerate(asked):
        where = f"outputs[{i}]"
        if not isinstance(wanted, dict):
            raise RequestError(400, f"{where} is {_shown(wanted)}: it must be an object, {{\"name\": \"{OUTPUT}\"}}")
        name = _field(wanted, "name", str, f"{where}.name")
        if name != OUTPUT:
            raise RequestError(400, f"unknown output {name!r} in {where}: the model has {OUTPUT!r}")
        if i:
            raise RequestError(400, f"output {OUTPUT!r} is asked for more than once: ask for it once")
        parameters = _field(wanted, "parameters", dict, f"{where}.parameters", {})
        if "shared_memory_region" in parameters:
            raise RequestError(400, f"{where} asks for shared memory, which this server does not offer: ask for "
                                    "the output in JSON or binary data")
        top = _field(parameters, "classification", int, f"{where}.parameters.classification", 0)
        if not 0 <= top <= classes:
            raise RequestError(400, f"{where}.parameters.classification is {top}: it must be a count of labels "
                                    f"from 0 to {classes}")
        outputs.append(_Output(top, _field(parameters, "binary_data", bool, f"{where}.parameters.binary_data",
                                           binary_default)))
    return outputs


def _binary_elements(binary: bytes, count: int) -> list[bytes]:
    """The ``count`` elements of BYTES binary data: each a 4-byte little-endian length, then its bytes."""
    elements, at = [], 0
    while at < len(binary) and len(elements) < count:
        if at + 4 > len(binary):
            raise RequestError(400, f"input {INPUT!r}: its binary data ends inside the length of element "
                                    f"{len(elements)}")
        (length,) = struct.unpack_from("<I", binary, at)
        at += 4
        if at + length > len(binary):
            raise RequestError(400, f"input {INPUT!r}: element {len(elements)} of its binary data is said to "
                                    f"hold {length:,} bytes, more than the binary data has left")
        elements.append(binary[at:at + length])
        at += length
    if len(elements) != count or at != len(binary):
        raise RequestError(400, f"input {INPUT!r} has shape [{count}], but its binary data holds "
                                f"{'more elements' if at < len(binary) else f'{len(elements)} element(s)'}")
    return elements


def _infer_request(body: bytes, header_length: str | None, *, classes: int, max_images: int) -> _InferRequest:
    """The request, checked whole, its images still encoded: the JSON, and with ``header_length`` (the
    Inference-Header-Content-Length header) the binary data after it."""
    binary = None
    if header_length is not None:
        if not re.fullmatch(r"[0-9]{1,12}", header_length) or int(header_length) > len(body):
            raise RequestError(400, f"{BINARY_HEADER} is {_shown(header_length)}: it must be the length of the "
                                    f"JSON at the body's start, a number of bytes up to the body's {len(body):,}")
        body, binary = body[:int(header_length)], body[int(header_length):]
    try:
        request = json.loads(body)
    except RecursionError:  # the parser's own bound on nesting, some 1,000 levels; a request needs 5
        raise RequestError(400, "the request's JSON nests too deeply to be an inference request") from None
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, "the request is not JSON (an inference request, or its header before the "
                                "binary data)") from None
    if not isinstance(request, dict):
        raise RequestError(400, f"the request is {_shown(request)}: it must be a JSON object with \"inputs\"")
    request_id = _field(request, "id", str, "id")
    try:
        (request_id or "").encode()
    except UnicodeEncodeError:  # a lone surrogate ("\ud800"): JSON allows it, the answer's UTF-8 cannot
        raise RequestError(400, "id holds a lone UTF-16 surrogate, which is no text: send an id of text") from None
    tensor, count = _input(request, max_images)
    outputs = _outputs(request, classes)
    return _InferRequest(request_id, _input_images(tensor, count, binary), outputs)


def _input(request: dict, max_images: int) -> tuple[dict, int]:
    """The one input, checked but for its data, and its image count."""
    inputs = _field(request, "inputs", list, "inputs")
    if not inputs or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestError(400, f"an inference request has one input, {INPUT!r}, of BYTES (the encoded images)")
    tensor = inputs[0]
    name = _field(tensor, "name", str, "inputs[0].name")
    if name != INPUT:
        raise RequestError(400, f"unknown input {name!r}: the model takes one input, {INPUT!r}")
    datatype = _field(tensor, "datatype", str, "inputs[0].datatype")
    if datatype != "BYTES":
        raise RequestError(400, f"input {INPUT!r} is of datatype {datatype!r}: it must be BYTES (the encoded "
                                "image files)")
    shape = _field(tensor, "shape", list, "inputs[0].shape", [])
    if len(shape) != 1 or not isinstance(shape[0], int) or isinstance(shape[0], bool) or shape[0] < 0:
        shown = ", ".join(_shown(d) for d in shape[:4]) + (", ..." if len(shape) > 4 else "")
        raise RequestError(400, f"input {INPUT!r} has shape [{shown}]: it must be [N], N the number of images")
    _check_count(shape[0], max_images)
    if "shared_memory_region" in _field(tensor, "parameters", dict, "inputs[0].parameters", {}):
        raise RequestError(400, f"input {INPUT!r} is in shared memory, which this server does not read: send "
                                "the images in JSON or binary data")
    return tensor, shape[0]


def _input_images(tensor: dict, count: int, binary: bytes | None) -> list[bytes]:
    """The input's ``count`` encoded images: from the binary data after the JSON (``binary``, None without
    the header) where the input gives its binary_data_size, else from its JSON data, base64 strings."""
    size = _field(tensor.get("parameters") or {}, "binary_data_size", int, "inputs[0].parameters.binary_data_size")
    data = tensor.get("data")
    if size is not None:
        if binary is None or data is not None:
            raise RequestError(400, f"input {INPUT!r} has binary_data_size, so its images come as binary data "
                                    f"after the JSON, which needs the {BINARY_HEADER} header and no \"data\"")
        if size != len(binary):
            raise RequestError(400, f"input {INPUT!r} has binary_data_size {size:,}, but the body holds "
                                    f"{len(binary):,} bytes after the JSON")
        return _binary_elements(binary, count)
    if binary:
        raise RequestError(400, f"the body holds {len(binary):,} bytes after the JSON that no input claims: give "
                                f"input {INPUT!r} its binary_data_size")
    if not isinstance(data, list):
        raise RequestError(400, f"input {INPUT!r}: its data must be a list of base64 strings, one per image")
    if len(data) != count:
        raise RequestError(400, f"input {INPUT!r} has shape [{count}] for {len(data)} element(s)")
    if not all(isinstance(element, str) for element in data):
        raise RequestError(400, f"input {INPUT!r}: its data must be a list of base64 strings, one per image")
    try:
        return [base64.b64decode(text, validate=True) for text in data]
    except (binascii.Error, ValueError):
        raise RequestError(400, f"input {INPUT!r}: an element is not base64") from None


def _bytes_payload(strings: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in (s.encode() for s in strings))


def _infer_response(request: _InferRequest, probabilities: np.ndarray, labels: list[str], name: str):
    """The answer to a checked request, in JSON or with binary data after a JSON header, as asked."""
    from starlette.responses import JSONResponse, Response

    outputs, chunks = [], []
    for wanted in request.outputs:
        if wanted.top:  # the classification extension: "probability:index:label", most probable first
            order = np.argsort(-probabilities, axis=1, kind="stable")[:, :wanted.top]
            strings = [f"{probabilities[i, j]:.6f}:{j}:{labels[j]}" for i in range(len(order)) for j in order[i]]
            output = {"name": OUTPUT, "datatype": "BYTES", "shape": [len(order), wanted.top]}
            payload, data = _bytes_payload(strings), strings
        else:
            output = {"name": OUTPUT, "datatype": "FP32", "shape": list(probabilities.shape)}
            payload, data = probabilities.astype("<f4").tobytes(), probabilities.ravel().tolist()
        if wanted.binary:
            output["parameters"] = {"binary_data_size": len(payload)}
            chunks.append(payload)
        else:
            output["data"] = data
        outputs.append(output)
    answer = {"model_name": name, "model_version": "1", "outputs": outputs}
    if request.id is not None:
        answer["id"] = request.id
    if not chunks:
        return JSONResponse(answer)
    header = json.dumps(answer).encode()
    return Response(header + b"".join(chunks), media_type="application/octet-stream",
                    headers={BINARY_HEADER: str(len(header))})


async def answer_predictions(endpoint: Endpoint, request):
    """TorchServe's shape: one raw image as the body, or a multipart form of files in field 'data'; each
    image's label and probabilities (a JSON object, or a list for a form). `imgtrain ui` answers with it too."""
    from starlette.responses import JSONResponse

    kind = _content_type(request)
    form = kind == "multipart/form-data"
    if not form and kind not in ("", "application/octet-stream") and not kind.startswith("image/"):
        raise RequestError(415, f"send an image (Content-Type image/*) or multipart form data with files in "
                                f"field 'data'; not {kind}")
    async with _receiving(request, endpoint.options, endpoint.bodies) as body:
        if form:
            blobs, names = await _form_files(request, body, endpoint.options.max_queue)
        elif not body:
            raise RequestError(400, "the body is empty: send an image")
        else:
            blobs, names = [body], ["the body"]
        probabilities = await endpoint.probabilities(blobs, names, request.is_disconnected)
    answers = []
    for name, row in zip(names, probabilities, strict=True):
        best = int(row.argmax())
        answers.append({"image": name, "label": endpoint.labels[best], "probability": float(row[best]),
                        "probabilities": dict(zip(endpoint.labels, map(float, row), strict=True))})
    return JSONResponse(answers if form else answers[0])


# --- The application ----------------------------------------------------------------------------------


def make_app(endpoint: Endpoint):
    """The Starlette application answering for ``endpoint``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from imgtrain import __version__

    def error(status: int, message: str) -> JSONResponse:
        busy = {"Retry-After": "1"} if status == 503 else None  # each 503 is a moment's: a budget or queue full
        return JSONResponse({"error": message}, status_code=status, headers=busy)

    def handler(function):
        async def handle(request: Request):
            name = request.path_params.get("name")
            if name is not None and name != endpoint.name:
                return error(404, f"unknown model {name!r}: this server has {endpoint.name!r}")
            version = request.path_params.get("version")
            if version is not None and version != "1":
                return error(404, f"model {name!r} has version 1 only, not {version!r}")
            try:
                return await function(request)
            except RequestError as exc:
                return error(exc.status, exc.message)
        return handle

    async def live(request: Request):
        return JSONResponse({"live": True})

    async def ready(request: Request):
        return JSONResponse({"ready": True})

    async def model_ready(request: Request):
        return JSONResponse({"name": endpoint.name, "ready": True})

    async def server_metadata(request: Request):
        return JSONResponse({"name": "imgtrain", "version": __version__,
                             "extensions": ["binary_tensor_data", "classification", "statistics"]})

    async def model_metadata(request: Request):
        return JSONResponse(endpoint.metadata())

    async def model_stats(request: Request):  # Triton's statistics extension, its counts only
        return JSONResponse({"model_stats": [{"name": endpoint.name, "version": "1",
                                              "inference_count": endpoint.batcher.images,
                                              "execution_count": endpoint.batcher.batches,
                                              "pending_count": endpoint.batcher.pending}]})

    async def infer(request: Request):
        header = request.headers.get(BINARY_HEADER)
        kind = _content_type(request)
        if header is None and kind not in ("", "application/json"):
            raise RequestError(415, f"an inference request is JSON (application/json), or JSON then binary data "
                                    f"with the {BINARY_HEADER} header; not {kind}")
        async with _receiving(request, endpoint.options, endpoint.bodies) as body:
            checked = _infer_request(body, header, classes=len(endpoint.labels),
                                     max_images=endpoint.options.max_queue)
            names = [f"image {i}" for i in range(len(checked.images))]
            probabilities = await endpoint.probabilities(checked.images, names, request.is_disconnected)
        return _infer_response(checked, probabilities, endpoint.labels, endpoint.name)

    async def predictions(request: Request):
        return await answer_predictions(endpoint, request)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, endpoint.close)

    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    routes = [
        Route("/v2/health/live", live), Route("/v2/health/ready", ready),
        Route("/v2", handler(server_metadata)),
        Route(model, handler(model_metadata)), Route(versioned, handler(model_metadata)),
        Route(model + "/ready", handler(model_ready)), Route(versioned + "/ready", handler(model_ready)),
        Route(model + "/stats", handler(model_stats)),
        Route(model + "/infer", handler(infer), methods=["POST"]),
        Route(versioned + "/infer", handler(infer), methods=["POST"]),
        Route("/predictions/{name}", handler(predictions), methods=["POST", "PUT"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def _name_of(model: Path) -> str:
    """A model's name in the URLs: its folder's (a model directory, an export's folder), or its file's stem."""
    return model.parent.name if model.is_file() and model.stem == "model" else model.stem if model.is_file() \
        else model.name


def serve(
    trained_model: Path | str,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    name: str | None = None,
    options: ServeOptions | None = None,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> None:
    """Serve a trained model over HTTP until SIGTERM or Ctrl-C (requests in flight finish first)."""
    _imports()
    import uvicorn

    from imgtrain.deploy.connections import ConnectionLimits, fit_open_files, guarded_protocol
    from imgtrain.deploy.listening import check_address, stop_signals_end_quietly

    options = options or ServeOptions()
    options.check()
    check_range("port", port, low=0, high=65535)
    check_address(host, port)
    backlog = fit_open_files(options.max_connections)
    name = name or _name_of(Path(trained_model).resolve())
    endpoint = Endpoint(trained_model, name, options, log)
    log(f"Serving {name} ({endpoint.describe}) on http://{host}:{port}: Open Inference Protocol at "
        f"/v2/models/{name}/infer, TorchServe's shape at /predictions/{name}; batches of up to "
        f"{options.max_batch_size} images, waiting up to {options.max_wait_ms:g} ms for them; Ctrl-C or SIGTERM "
        "stops it once the requests in flight are answered")
    protocol = guarded_protocol(ConnectionLimits(options.max_connections, options.header_timeout_s,
                                                   options.body_timeout_s))
    config = uvicorn.Config(make_app(endpoint), host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=30, backlog=backlog, http=protocol)
    with stop_signals_end_quietly():
        uvicorn.Server(config).run()
    log(f"Stopped serving {name}: {endpoint.batcher.images:,} images scored in {endpoint.batcher.batches:,} batches")
