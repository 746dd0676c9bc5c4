"""An OpenAI-compatible HTTP server for a trained checkpoint, with a chat page.

``python -m llava.serve.api --model DIR --port 8000`` serves (Starlette on uvicorn):

* ``POST /v1/chat/completions``: OpenAI's chat completions (text and ``image_url`` parts, ``stream`` as
  server-sent events in OpenAI's chunk format, ``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``)
  plus ``compression``, a preset name per request (default: the server's), and ``ignore_eos`` (as vLLM's: exactly
  ``max_tokens`` tokens, for benchmarks). ``usage`` adds the visual tokens
  each decoder layer kept and the batch the request ran in. Requests arriving together are batched
  (:mod:`llava.serve.engine`); what a body may hold and where images may come from: :mod:`llava.serve.protocol`.
* ``GET /v1/models``: the model, with the compression presets it runs; ``GET /health``: the engine's counters;
  ``GET /``: the chat page.

Errors are OpenAI-style JSON with their HTTP status, and the server keeps serving. With ``--api-key`` (or the
``LLAVA_API_KEY`` environment variable, which keeps the key out of the process list) ``/v1/*`` need
``Authorization: Bearer <key>``; the key is never logged. A client that disconnects cancels its answer.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llava.serve.engine import BatchingEngine, Delta, Event, Failed, Finished, GenerationJob
from llava.serve.errors import ServeError
from llava.serve.protocol import ImageStore, ParsedRequest, ServeLimits, parse_chat_request

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25
"""How often a waiting non-streamed request checks that its client is still there."""


def error_response(error: ServeError) -> JSONResponse:
    """``error`` as OpenAI's JSON error body with its status."""
    return JSONResponse(error.to_dict(), status_code=error.status)


class ChatServer:
    """The routes over one :class:`BatchingEngine`: request checks, batching, streaming, errors."""

    def __init__(
        self,
        engine: BatchingEngine,
        model_name: str,
        limits: ServeLimits | None = None,
        image_folder: Path | None = None,
        api_key: str | None = None,
        scratch_dir: Path | None = None,
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.limits = limits or ServeLimits()
        self._scratch = None if scratch_dir is not None else tempfile.TemporaryDirectory(prefix="llava-serve-")
        self.images = ImageStore(scratch_dir or Path(self._scratch.name), image_folder, self.limits)
        self._api_key = api_key
        self.created = int(time.time())

    def app(self) -> Starlette:
        """The ASGI application."""
        routes = [
            Route("/", self.page, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ]
        return Starlette(routes=routes, exception_handlers={404: self._not_found, 405: self._not_allowed})

    # ----- plain routes -----
    async def page(self, request: Request) -> HTMLResponse:
        """The chat page (one static file, no build step)."""
        return HTMLResponse(resources.files("llava.serve").joinpath("static/chat.html").read_text(encoding="utf-8"))

    async def health(self, request: Request) -> JSONResponse:
        """Liveness and the engine's counters (requests in progress, batches, largest batch...)."""
        return JSONResponse({"status": "ok", **vars(self.engine.stats)})

    async def models(self, request: Request) -> Response:
        """The one model served, with its compression presets."""
        if (denied := self._check_key(request)) is not None:
            return denied
        return JSONResponse({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "duet-vlm",
            "compression_presets": self.engine.presets, "default_compression": self.engine.default_compression,
        }]})  # fmt: skip

    async def _not_found(self, request: Request, exc: Exception) -> JSONResponse:
        return error_response(ServeError(404, f"no route {request.url.path}"))

    async def _not_allowed(self, request: Request, exc: Exception) -> JSONResponse:
        return error_response(ServeError(405, f"{request.method} is not allowed on {request.url.path}"))

    def _check_key(self, request: Request) -> JSONResponse | None:
        if self._api_key is None:
            return None
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self._api_key.encode()):
            return error_response(ServeError(401, "missing or wrong API key (Authorization: Bearer <key>)",
                                             code="invalid_api_key"))  # fmt: skip
        return None

    # ----- chat completions -----
    async def _body(self, request: Request) -> Any:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ServeError(413, f"the body is larger than {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ServeError(413, f"the body is larger than {limit} bytes")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ServeError(400, f"the body is not valid JSON: {error}") from error

    async def chat_completions(self, request: Request) -> Response:
        """OpenAI's ``POST /v1/chat/completions`` (streamed or not)."""
        if (denied := self._check_key(request)) is not None:
            return denied
        try:
            body = await self._body(request)
            parsed = await asyncio.to_thread(parse_chat_request, body, self.images)
        except ServeError as error:
            return error_response(error)
        if parsed.model is not None and parsed.model != self.model_name:
            parsed.remove_scratch()
            return error_response(ServeError(404, f"model {parsed.model!r} is not served here; "
                                             f"this server has {self.model_name!r}", param="model",
                                             code="model_not_found"))  # fmt: skip
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        job = GenerationJob(
            request=parsed.request, sink=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
            max_tokens=parsed.max_tokens, temperature=parsed.temperature, top_p=parsed.top_p, seed=parsed.seed,
            stop=parsed.stop, compression=parsed.compression, ignore_eos=parsed.ignore_eos,
        )  # fmt: skip
        try:
            self.engine.submit(job)
        except ServeError as error:
            parsed.remove_scratch()
            return error_response(error)
        try:
            first = await self._next_event(events, request, job)
        except BaseException:
            job.cancel()
            parsed.remove_scratch()
            raise
        if first is None or isinstance(first, Failed):
            parsed.remove_scratch()
            return Response(status_code=499) if first is None else error_response(first.error)
        if parsed.stream:
            return StreamingResponse(self._chunks(first, events, job, parsed), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        try:
            event = first
            while not isinstance(event, Finished | Failed):
                event = await self._next_event(events, request, job)
                if event is None:
                    return Response(status_code=499)
        finally:
            parsed.remove_scratch()
        if isinstance(event, Failed):
            return error_response(event.error)
        return JSONResponse(self._completion(event))

    async def _next_event(self, events: asyncio.Queue[Event], request: Request, job: GenerationJob) -> Event | None:
        """The job's next event; ``None`` (and the job cancelled) when the client went away while waiting."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    return None

    def _completion(self, finished: Finished) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [{
                "index": 0, "message": {"role": "assistant", "content": finished.text},
                "finish_reason": finished.reason, "logprobs": None,
            }],
            "usage": finished.usage.to_dict() if finished.usage is not None else None,
        }  # fmt: skip

    async def _chunks(
        self, first: Event, events: asyncio.Queue[Event], job: GenerationJob, parsed: ParsedRequest
    ) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, ``data: [DONE]`` last. Leaving early (the client went
        away: Starlette cancels this generator) cancels the job, which frees its slot."""
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict[str, Any], reason: str | None = None, **extra: Any) -> str:
            choices = [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]
            payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                       "model": self.model_name, "choices": choices, **extra}  # fmt: skip
            return f"data: {json.dumps(payload)}\n\n"

        event: Event | None = first
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                if isinstance(event, Delta):
                    yield chunk({"content": event.text})
                elif isinstance(event, Failed):
                    yield f"data: {json.dumps(event.error.to_dict())}\n\n"
                    break
                elif isinstance(event, Finished):
                    yield chunk({}, event.reason)
                    if parsed.include_usage and event.usage is not None:
                        usage = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                 "model": self.model_name, "choices": [], "usage": event.usage.to_dict()}  # fmt: skip
                        yield f"data: {json.dumps(usage)}\n\n"
                    break
                event = await events.get()
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # a no-op once the job ended
            parsed.remove_scratch()


class BackgroundServer:
    """A :class:`ChatServer` on uvicorn in a thread of this process, for tests and the load benchmark:
    ``with BackgroundServer(server) as url: ...`` (``port=0`` takes a free port; ``url`` is its address)."""

    def __init__(self, server: ChatServer, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        config = uvicorn.Config(server.app(), host=host, port=port, log_level="warning", lifespan="off")
        self._uvicorn = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._uvicorn.run, name="llava-serve-http", daemon=True)
        self.host = host

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start (see the log)")
            time.sleep(0.02)
        port = self._uvicorn.servers[0].sockets[0].getsockname()[1]
        return f"http://{self.host}:{port}"

    def __exit__(self, *exc: object) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(timeout=30)


def build_parser() -> argparse.ArgumentParser:
    """The server's command line."""
    parser = argparse.ArgumentParser(prog="python -m llava.serve.api", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory (any family load_pipeline reads)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="the model id clients name (default: folder name)")
    parser.add_argument("--compression", default=None, help="default preset (default: the checkpoint's)")
    parser.add_argument("--presets", nargs="*", default=None, help="the presets clients may ask for (default: all)")
    parser.add_argument("--image-folder", type=Path, default=None,
                        help="local images clients may name (default: none, only data: URLs)")  # fmt: skip
    parser.add_argument("--api-key", default=None, help="require this key (or set LLAVA_API_KEY, kept out of ps)")
    parser.add_argument("--max-batch", type=int, default=8, help="most requests per batch")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a batch collects requests")
    parser.add_argument("--max-pending", type=int, default=64, help="requests in progress before 503s")
    parser.add_argument("--max-body-mb", type=float, default=32.0)
    parser.add_argument("--max-image-mb", type=float, default=16.0)
    parser.add_argument("--max-image-pixels", type=int, default=40_000_000)
    parser.add_argument("--max-images", type=int, default=8, help="images per request")
    parser.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: CUDA when available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on CUDA, float32 on the CPU")  # fmt: skip
    parser.add_argument("--log-level", default="info")
    return parser


def build_server(args: argparse.Namespace) -> ChatServer:
    """Load the checkpoint and wrap it in a :class:`ChatServer` as the command line asks."""
    import torch

    from llava.inference import load_pipeline
    from llava.pipeline import default_device

    device = torch.device(args.device) if args.device else default_device()
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    pipeline = load_pipeline(args.model, dtype=getattr(torch, dtype_name), device=device)
    engine = BatchingEngine(
        pipeline, compression=args.compression, max_batch=args.max_batch, batch_wait_s=args.batch_wait_ms / 1000,
        max_pending=args.max_pending, presets=args.presets,
    )  # fmt: skip
    limits = ServeLimits(
        max_body_bytes=int(args.max_body_mb * 2**20), max_image_bytes=int(args.max_image_mb * 2**20),
        max_image_pixels=args.max_image_pixels, max_images=args.max_images, max_tokens=args.max_tokens_limit,
        default_max_tokens=min(ServeLimits.default_max_tokens, args.max_tokens_limit),
    )  # fmt: skip
    return ChatServer(
        engine, args.served_model_name or Path(args.model).resolve().name, limits, args.image_folder,
        api_key=args.api_key or os.environ.get("LLAVA_API_KEY") or None,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until interrupted."""
    import uvicorn

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = build_server(args)
    logger.info("serving %s on http://%s:%d (presets: %s)", server.model_name, args.host, args.port,
                ", ".join(server.engine.presets))  # fmt: skip
    uvicorn.run(server.app(), host=args.host, port=args.port, log_level=args.log_level.lower())
    server.engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
