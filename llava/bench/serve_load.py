"""Load test of the OpenAI-compatible server (:mod:`llava.serve.api`): concurrent streamed chat completions.

Sends ``--requests`` streamed chat-completion requests (``stream: true`` with ``include_usage``, temperature 0)
with at most ``--concurrency`` in flight (several values: each in turn), once per compression preset
(``--presets``, the per-request ``compression`` field), and reports per preset: requests/s and output tokens/s
over the preset's wall time, time to first content token (TTFT) and inter-token latency (ITL, between content
chunks) at p50/p90/p99, the mean batch size the server reported in ``usage`` and the errors. ``--warmup``
requests per preset run first, one at a time, unmeasured (the first request of a preset pays one-time costs:
the preset switch, CUDA-graph capture).

The server is either one already running (``--url``) or started in this process (``--model DIR``: the
checkpoint on a :class:`~llava.serve.engine.BatchingEngine` behind a :class:`~llava.serve.api.BackgroundServer`
on the loopback address; ``--max-batch`` and ``--batch-wait-ms`` as the server's). Images (``--image``, one or
more, used round-robin) go as ``data:`` URLs; without ``--image`` an in-process run of a playground checkpoint
uses the demo images of the ``image_folder`` recorded in its ``run_config.json``, anything else is text-only
(``--no-image`` forces text-only).

Bounded: every request has a timeout (``--request-timeout-s``), and nothing is sent after ``--timeout-s``
(counted from the first request; an in-process model load comes before): requests not sent by then, and those
cut, count as errors and later presets are not started. A failed request is counted, never fatal. Writes
FILE.json (a list of rows, one per preset and concurrency, each with the run's settings, the machine and the
per-request records) and FILE.md, and prints the table.

    python -m llava.bench.serve_load --model /tmp/serve_pg/model --requests 32 --concurrency 8 1 --max-tokens 32 \
        --presets none duet_128 --device cpu --out runs/bench/serve-load.json
    python -m llava.bench.serve_load --url http://127.0.0.1:8000 --image photo.png --presets none duet_64
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import math
import mimetypes
import platform
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from llava.bench import report

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "Describe the image in detail."
TEXT_PROMPT = "Tell me a long story about a red square and a blue circle."
MAX_DEFAULT_IMAGES = 8
"""At most this many playground images are cycled through when ``--image`` is not given."""

TABLE_COLUMNS = (
    ("preset", "preset"),
    ("succeeded", "ok"),
    ("errors", "errors"),
    ("concurrency", "conc."),
    ("requests_per_s", "req/s"),
    ("output_tokens_per_s", "out tok/s"),
    ("ttft_p50_ms", "TTFT p50 ms"),
    ("ttft_p90_ms", "TTFT p90 ms"),
    ("ttft_p99_ms", "TTFT p99 ms"),
    ("itl_p50_ms", "ITL p50 ms"),
    ("itl_p90_ms", "ITL p90 ms"),
    ("itl_p99_ms", "ITL p99 ms"),
    ("mean_batch_size", "mean batch"),
    ("mean_completion_tokens", "tokens/answer"),
    ("no_text", "no text"),
    ("wall_s", "wall s"),
)
NOTES = (
    "req/s and out tok/s: successful requests and their completion tokens over the preset's wall time (first "
    "request sent to last answer ended, warm-up excluded).",
    "TTFT: request sent to its first non-empty content chunk; ITL: time between consecutive content chunks of an "
    "answer (all answers pooled); percentiles by linear interpolation.",
    "no text: answers whose tokens decoded to no text at all (special tokens only); they have no TTFT or ITL.",
    "mean batch: the batch size the server reported in each answer's usage (how many requests its batch held).",
)


# ----- statistics -----
def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values`` by linear interpolation between closest ranks (NumPy's
    default); NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latency_percentiles(values: Sequence[float], name: str) -> dict[str, float]:
    """``{name}_p50_ms``, ``_p90_ms``, ``_p99_ms`` of latencies given in seconds."""
    return {f"{name}_p{q}_ms": percentile(values, q) * 1000 for q in (50, 90, 99)}


# ----- requests -----
@dataclass
class RequestRecord:
    """What one streamed request measured (times in seconds; ``error`` set when it failed)."""

    index: int
    ok: bool = False
    error: str | None = None
    status: int | None = None
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    total_s: float | None = None
    content_chunks: int = 0
    completion_tokens: int = 0
    batch_size: int | None = None
    finish_reason: str | None = None
    started_at: float = 0.0
    ended_at: float = 0.0


def image_data_url(path: Path) -> str:
    """``path`` as a ``data:image/...;base64,`` URL."""
    kind = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def playground_images(model_dir: Path) -> list[Path]:
    """The demo images (else any PNGs) of the ``image_folder`` in ``model_dir/run_config.json``; empty when the
    checkpoint records none (not a playground run) or the folder is gone."""
    config_path = model_dir / "run_config.json"
    if not config_path.is_file():
        return []
    try:
        folder = json.loads(config_path.read_text(encoding="utf-8")).get("image_folder")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return []
    if not folder or not Path(folder).is_dir():
        return []
    images = sorted(Path(folder).glob("demo_*.png")) or sorted(Path(folder).glob("*.png"))
    return images[:MAX_DEFAULT_IMAGES]


def request_bodies(
    count: int, images: Sequence[Path], max_tokens: int, preset: str, prompt: str | None, ignore_eos: bool = False
) -> list[dict[str, Any]]:
    """``count`` streamed chat-completion bodies for ``preset``; images round-robin (none: text-only);
    ``ignore_eos``: every answer runs to ``max_tokens`` (fixed lengths, as vLLM's benchmark)."""
    urls = [image_data_url(path) for path in images]
    bodies = []
    for index in range(count):
        text = prompt or (DEFAULT_PROMPT if urls else TEXT_PROMPT)
        content: Any = text
        if urls:
            content = [
                {"type": "image_url", "image_url": {"url": urls[index % len(urls)]}},
                {"type": "text", "text": text},
            ]
        bodies.append({
            "messages": [{"role": "user", "content": content}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": max_tokens, "temperature": 0,
            "compression": preset, **({"ignore_eos": True} if ignore_eos else {}),
        })  # fmt: skip
    return bodies


async def stream_request(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], record: RequestRecord, timeout_s: float
) -> RequestRecord:
    """Send one streamed request and fill ``record``; never raises for a failed request (its ``error`` says why)."""
    record.started_at = started = time.perf_counter()
    last: float | None = None
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", url, json=body) as response:
                record.status = response.status_code
                if response.status_code != 200:
                    text = (await response.aread()).decode("utf-8", "replace")
                    record.error = f"HTTP {response.status_code}: {text[:300]}"
                    return record
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    payload = json.loads(data)
                    if "error" in payload:
                        record.error = f"stream error: {payload['error'].get('message', payload['error'])}"
                        return record
                    for choice in payload.get("choices") or []:
                        if choice.get("delta", {}).get("content"):
                            now = time.perf_counter()
                            if last is None:
                                record.ttft_s = now - started
                            else:
                                record.itl_s.append(now - last)
                            last = now
                            record.content_chunks += 1
                        if choice.get("finish_reason"):
                            record.finish_reason = choice["finish_reason"]
                    if payload.get("usage"):
                        record.completion_tokens = int(payload["usage"].get("completion_tokens", 0))
                        record.batch_size = payload["usage"].get("batch_size")
        if record.finish_reason is None:
            record.error = "the stream ended without a finish_reason"
        elif record.batch_size is None:
            record.error = "no usage chunk (include_usage) in the stream"
        else:
            record.ok = True
    except TimeoutError:
        record.error = f"timed out after {timeout_s:.1f} s"
    except (httpx.HTTPError, json.JSONDecodeError, ValueError, TypeError, AttributeError) as error:
        record.error = f"{type(error).__name__}: {error}"
    finally:
        record.ended_at = time.perf_counter()
        record.total_s = record.ended_at - started
    return record


@dataclass(frozen=True)
class LoadConfig:
    """What one run sends."""

    requests: int = 32
    concurrency: int = 8
    max_tokens: int = 32
    presets: tuple[str, ...] = ("none", "duet_128")
    images: tuple[Path, ...] = ()
    prompt: str | None = None
    warmup: int = 1
    request_timeout_s: float = 120.0
    timeout_s: float = 600.0
    api_key: str | None = None
    ignore_eos: bool = False


def summarize(preset: str, records: Sequence[RequestRecord], config: LoadConfig) -> dict[str, Any]:
    """One preset's row: throughput, latency percentiles, batch sizes and errors of its measured requests."""
    done = [record for record in records if record.ok]
    sent = [record for record in records if record.started_at]
    wall = (max(r.ended_at for r in sent) - min(r.started_at for r in sent)) if sent else math.nan
    tokens = sum(record.completion_tokens for record in done)
    errors: dict[str, int] = {}
    for record in records:
        if not record.ok:
            kind = (record.error or "unknown").split(":")[0]
            errors[kind] = errors.get(kind, 0) + 1
    ok_rate = wall > 0 and math.isfinite(wall)
    return {
        "preset": preset,
        "requests": len(records),
        "succeeded": len(done),
        "errors": len(records) - len(done),
        "error_kinds": errors,
        "concurrency": config.concurrency,
        "max_tokens": config.max_tokens,
        "images": len(config.images),
        "wall_s": wall,
        "requests_per_s": len(done) / wall if ok_rate else math.nan,
        "output_tokens_per_s": tokens / wall if ok_rate else math.nan,
        "completion_tokens": tokens,
        "mean_completion_tokens": tokens / len(done) if done else math.nan,
        "no_text": sum(record.content_chunks == 0 for record in done),
        **latency_percentiles([r.ttft_s for r in done if r.ttft_s is not None], "ttft"),
        **latency_percentiles([gap for r in done for gap in r.itl_s], "itl"),
        "mean_total_ms": statistics.fmean(r.total_s for r in done) * 1000 if done else math.nan,
        "mean_batch_size": statistics.fmean(r.batch_size for r in done) if done else math.nan,
        "max_batch_size": max((r.batch_size for r in done), default=None),
        "request_records": [asdict(record) for record in records],
    }


async def run_preset(
    client: httpx.AsyncClient, url: str, preset: str, config: LoadConfig, deadline: float
) -> dict[str, Any]:
    """Warm-up, then ``config.requests`` requests of ``preset`` with at most ``config.concurrency`` in flight."""
    endpoint = f"{url}/v1/chat/completions"
    bodies = request_bodies(
        config.requests + config.warmup, config.images, config.max_tokens, preset, config.prompt, config.ignore_eos
    )
    for index in range(config.warmup):
        left = deadline - time.perf_counter()
        if left <= 0:
            break
        warm = await stream_request(
            client, endpoint, bodies[index], RequestRecord(-1), min(config.request_timeout_s, left)
        )
        if not warm.ok:
            logger.warning("%s: warm-up request failed: %s", preset, warm.error)
    gate = asyncio.Semaphore(config.concurrency)
    records = [RequestRecord(index) for index in range(config.requests)]

    async def one(record: RequestRecord) -> RequestRecord:
        async with gate:
            left = deadline - time.perf_counter()
            if left <= 0:
                record.error = "run timeout: not sent"
                return record
            return await stream_request(client, endpoint, bodies[config.warmup + record.index], record,
                                        min(config.request_timeout_s, left))  # fmt: skip

    await asyncio.gather(*(one(record) for record in records))
    row = summarize(preset, records, config)
    logger.info("%s: %d/%d ok, %.2f req/s, %.1f out tok/s, mean batch %.2f", preset, row["succeeded"],
                row["requests"], row["requests_per_s"], row["output_tokens_per_s"], row["mean_batch_size"])  # fmt: skip
    return row


async def run_load(url: str, config: LoadConfig, deadline: float | None = None) -> list[dict[str, Any]]:
    """Every preset in turn against the server at ``url``; one row per preset. Nothing is sent after ``deadline``
    (a ``time.perf_counter`` value; default ``config.timeout_s`` from now): a preset not started by then gets a
    row of errors."""
    deadline = time.perf_counter() + config.timeout_s if deadline is None else deadline
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=config.concurrency + 1, max_keepalive_connections=config.concurrency + 1)
    timeout = httpx.Timeout(config.request_timeout_s, connect=min(10.0, config.request_timeout_s))
    rows = []
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        served = await served_presets(client, url, min(10.0, config.request_timeout_s))
        for preset in config.presets:
            if served is not None and preset not in served:
                logger.warning("preset %s is not among the server's (%s): its requests will fail", preset,
                               ", ".join(served))  # fmt: skip
            if time.perf_counter() >= deadline:
                logger.warning("%s: not started, the run's %.0f s are spent", preset, config.timeout_s)
                records = [RequestRecord(i, error="run timeout: not sent") for i in range(config.requests)]
                rows.append(summarize(preset, records, config))
                continue
            logger.info("%s: %d requests, concurrency %d, max_tokens %d", preset, config.requests,
                        config.concurrency, config.max_tokens)  # fmt: skip
            rows.append(await run_preset(client, url, preset, config, deadline))
    return rows


async def served_presets(client: httpx.AsyncClient, url: str, timeout_s: float) -> list[str] | None:
    """The presets ``GET /v1/models`` lists (``None`` when it cannot be read within ``timeout_s``)."""
    try:
        response = await client.get(f"{url}/v1/models", timeout=timeout_s)
        response.raise_for_status()
        return list(response.json()["data"][0]["compression_presets"])
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, IndexError, TypeError) as error:
        logger.warning("cannot read the server's presets from /v1/models: %s", error)
        return None


# ----- the in-process server -----
@contextlib.contextmanager
def local_server(
    model: Path, device: str | None, dtype: str | None, max_batch: int, batch_wait_ms: float, max_pending: int
) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(url, machine)`` of ``model`` served on the loopback address by a :class:`BackgroundServer` in this
    process (the engine is closed on exit)."""
    import torch

    from llava.inference import load_pipeline
    from llava.serve.api import BackgroundServer, ChatServer
    from llava.serve.engine import BatchingEngine

    load_at_start = report.load_average()
    torch_device = report.resolve_device(device)
    torch_dtype = getattr(torch, dtype or ("bfloat16" if torch_device.type == "cuda" else "float32"))
    pipeline = load_pipeline(model, dtype=torch_dtype, device=torch_device)
    engine = BatchingEngine(pipeline, max_batch=max_batch, batch_wait_s=batch_wait_ms / 1000, max_pending=max_pending)
    attention = getattr(pipeline.model.config, "_attn_implementation", None) or "unknown"
    try:
        with BackgroundServer(ChatServer(engine, model.resolve().name)) as url:
            machine = report.machine_info(torch_device, torch_dtype, attention, load_at_start)
            machine.update(server="in-process", max_batch=max_batch, batch_wait_ms=batch_wait_ms)
            yield url, machine
            machine["load_average_end"] = report.load_average()
    finally:
        engine.close()


# ----- command line -----
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m llava.bench.serve_load", description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--model", type=Path, help="checkpoint directory to serve in this process (loopback)")
    parser.add_argument("--requests", type=int, default=32, help="measured requests per preset")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8],
                        help="most requests in flight; several values run the presets at each in turn")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--ignore-eos", action="store_true", help="every answer runs to --max-tokens (fixed lengths)")
    parser.add_argument("--presets", nargs="+", default=["none", "duet_128"], help="compression presets, in turn")
    parser.add_argument("--image", type=Path, nargs="+", default=None,
                        help="images sent as data: URLs, round-robin (default: a playground checkpoint's demo "
                        "images with --model, else text-only)")  # fmt: skip
    parser.add_argument("--no-image", action="store_true", help="text-only requests")
    parser.add_argument("--prompt", default=None, help="the user text (default: a describe-the-image prompt)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured requests per preset, one at a time")
    parser.add_argument("--request-timeout-s", type=float, default=120.0, help="limit per request")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="limit of the whole run")
    parser.add_argument("--api-key", default=None, help="Bearer key of a --url server")
    parser.add_argument("--out", default="runs/bench/serve_load.json", help="FILE.json; FILE.md too")
    local = parser.add_argument_group("in-process server (--model)")
    local.add_argument("--device", default=None, help="cuda or cpu (default: CUDA when available)")
    local.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="default: bfloat16 on CUDA, float32 on the CPU")  # fmt: skip
    local.add_argument("--max-batch", type=int, default=8, help="most requests per batch")
    local.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a batch collects requests")
    args = parser.parse_args(argv)
    if min(args.requests, *args.concurrency, args.max_tokens, args.max_batch) < 1 or args.warmup < 0:
        parser.error("--requests, --concurrency, --max-tokens and --max-batch must be >= 1, --warmup >= 0")
    if args.timeout_s <= 0 or args.request_timeout_s <= 0 or args.batch_wait_ms < 0:
        parser.error("--timeout-s and --request-timeout-s must be > 0, --batch-wait-ms >= 0")
    if args.image and args.no_image:
        parser.error("--image and --no-image exclude each other")
    missing = [str(path) for path in args.image or [] if not path.is_file()]
    if missing:
        parser.error(f"image not found: {', '.join(missing)}")
    if args.model is not None and not args.model.is_dir():
        parser.error(f"model directory not found: {args.model}")
    if args.url is not None:
        args.url = args.url.rstrip("/")
    return args


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The load test the parsed ``args`` ask for; one row per preset."""
    if args.no_image:
        images: list[Path] = []
    elif args.image:
        images = list(args.image)
    else:
        images = playground_images(args.model) if args.model is not None else []
    logger.info("requests carry %s", f"{len(images)} image(s), round-robin" if images else "no image (text-only)")
    config = LoadConfig(
        requests=args.requests, max_tokens=args.max_tokens, presets=tuple(args.presets),
        images=tuple(images), prompt=args.prompt, warmup=args.warmup, request_timeout_s=args.request_timeout_s,
        timeout_s=args.timeout_s, api_key=args.api_key, ignore_eos=args.ignore_eos,
    )  # fmt: skip

    def every_concurrency(url: str) -> list[dict[str, Any]]:
        deadline = time.perf_counter() + config.timeout_s
        rows = []
        for concurrency in args.concurrency:
            rows += asyncio.run(run_load(url, dataclasses.replace(config, concurrency=concurrency), deadline))
        return rows

    if args.url is not None:
        machine = {"server": args.url, "client": platform.node(), "load_average_start": report.load_average()}
        rows = every_concurrency(args.url)
    else:
        max_pending = max(64, 2 * max(args.concurrency))
        with local_server(args.model, args.device, args.dtype, args.max_batch, args.batch_wait_ms, max_pending) as (
            url,
            machine,
        ):
            rows = every_concurrency(url)
    settings = {"requests": args.requests, "warmup": args.warmup, "image_files": [str(path) for path in images],
                "model": str(args.model) if args.model else None, "url": args.url}  # fmt: skip
    return [{**row, "settings": settings, "machine": machine} for row in rows]


def write_outputs(rows: list[dict[str, Any]], out: str) -> str:
    """FILE.json (rows) and FILE.md (title, machine, table, notes); returns the table."""
    path = Path(out)
    json_path = path if path.suffix == ".json" else path.with_suffix(".json")
    report.write_json(rows, json_path)
    first = rows[0]
    media = f"{first['images']} image(s) round-robin" if first["images"] else "text-only"
    concurrency = ", ".join(str(value) for value in dict.fromkeys(row["concurrency"] for row in rows))
    title = (
        f"Serving under load: {first['requests']} streamed requests per preset, concurrency {concurrency}, "
        f"max_tokens {first['max_tokens']}, {media}"
    )
    return report.write_markdown(rows, TABLE_COLUMNS, json_path.with_suffix(".md"), title, NOTES)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the load test, write FILE.json/.md, print the table; returns the rows."""
    args = parse_args(argv)
    rows = run(args)
    table = write_outputs(rows, args.out)
    print(table)
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    main()
