"""Shared plumbing of the speed benchmarks: devices, timers, memory peaks, statistics and outputs.

Both :mod:`llava.bench.train_speed` and :mod:`llava.bench.infer_speed` write the same three files
for a run: ``FILE.json`` (a list of rows, one per measured configuration, each carrying the
``machine`` block so rows from different runs can be concatenated), ``FILE.md`` (a Markdown table)
and ``FILE.png`` (a bar chart of measured vs FLOP-model ratios).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import json
import logging
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_CLEAR_REFS = Path("/proc/self/clear_refs")


# ----- device and dtype -----
def resolve_device(name: str | None) -> torch.device:
    """``cuda`` when available and not overridden, else ``cpu``; an explicit ``cuda`` without a GPU fails."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested but torch.cuda.is_available() is False")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """Parameter dtype: bf16 on CUDA and fp32 on CPU unless ``--dtype`` says otherwise."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise SystemExit(f"--dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def resolve_runtime(
    device_name: str | None, dtype_name_: str | None, attn_implementation: str | None
) -> tuple[torch.device, torch.dtype, str]:
    """Device, dtype and attention kernel of a benchmark run (flash-attn only with 16-bit dtypes)."""
    from llava.utils.attention import default_attn_implementation

    device = resolve_device(device_name)
    dtype = resolve_dtype(dtype_name_, device)
    attn = attn_implementation or default_attn_implementation()
    if device.type == "cuda" and attn == "flash_attention_2" and dtype == torch.float32:
        logger.warning("flash_attention_2 needs bf16/fp16; using sdpa for fp32")
        attn = "sdpa"
    return device, dtype, attn


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, NaN when the denominator is 0."""
    return numerator / denominator if denominator else float("nan")


def dtype_name(dtype: torch.dtype) -> str:
    """Short name of a dtype (``bf16``, ``fp16``, ``fp32``)."""
    return {value: key for key, value in DTYPES.items()}.get(dtype, str(dtype))


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so host timers measure device work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_context(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed-precision autocast on CUDA for half dtypes (as the HF Trainer's ``--bf16``); nothing otherwise."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()


class IntervalTimer:
    """Seconds between marks inside one synchronised region, without host syncs between the marks.

    On CUDA the marks are CUDA events (read after the final sync), so timing a sub-phase such as the
    optimizer step does not stall the stream; on CPU they are ``time.perf_counter`` readings.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._marks: list[Any] = []

    def mark(self) -> None:
        """Record the current point of the stream (CUDA) or of the host clock (CPU)."""
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append(event)
        else:
            self._marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        """Seconds between consecutive marks; call after :func:`synchronize` on CUDA."""
        if self.device.type == "cuda":
            return [a.elapsed_time(b) / 1000.0 for a, b in zip(self._marks, self._marks[1:], strict=False)]
        return [b - a for a, b in zip(self._marks, self._marks[1:], strict=False)]


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Use ``count`` intra-op CPU threads inside the block (0: leave torch's setting), then restore.

    On a CPU shared with other jobs, fewer threads than cores avoids OpenMP threads spinning while
    they wait for each other, which can slow small kernels by orders of magnitude.
    """
    previous = torch.get_num_threads()
    if count > 0:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ----- memory -----
def _current_rss_mb() -> float:
    """Resident set size now (Linux ``/proc/self/statm``); falls back to the peak when unavailable."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return _maxrss_mb()


def _maxrss_mb() -> float:
    """Peak RSS of the process as reported by ``getrusage`` (KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def release_memory(device: torch.device) -> None:
    """Return freed tensors' memory before the next model is built (collected, CUDA cache emptied)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0, ``clear_refs`` 5); False where not allowed."""
    try:
        with open(_CLEAR_REFS, "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a measured region, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` (absolute: weights, optimizer states, activations),
    reset before the region. CPU: the process peak RSS from ``resource.getrusage`` minus the RSS at the
    start of the region, i.e. what the region allocates on top of what is resident (weights, optimizer
    states). Approximate: RSS counts allocator caching and pages, not tensors. Where the kernel lets
    us reset the high-water mark (Linux ``/proc/self/clear_refs``) the peak is the region's own;
    elsewhere it is the process-lifetime peak, so only the first region that raises it shows a delta.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_rss_delta"
        self.exact_window = device.type == "cuda"
        self._start_rss = 0.0
        self.peak_mb = 0.0
        self.peak_rss_mb = 0.0

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        """Measure the peak of the block; updates :attr:`peak_mb` (and :attr:`peak_rss_mb` on CPU)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.exact_window = _reset_peak_rss()
            self._start_rss = _current_rss_mb()
        yield
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak = _maxrss_mb()
            self.peak_rss_mb = peak
            self.peak_mb = max(peak - self._start_rss, 0.0)


# ----- statistics -----
def median_iqr(values: Sequence[float]) -> tuple[float, float]:
    """Median and inter-quartile range (inclusive quartiles; 0 for fewer than two values)."""
    if not values:
        return math.nan, math.nan
    if len(values) < 2:
        return float(values[0]), 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return float(statistics.median(values)), float(q3 - q1)


NOISY_RELATIVE_IQR = 0.25
"""Rows whose IQR exceeds this fraction of the median are flagged: the machine was not quiet."""


def is_noisy(median: float, iqr: float) -> bool:
    """Whether a timing's spread makes its median unreliable (IQR above :data:`NOISY_RELATIVE_IQR` of it)."""
    return bool(median > 0 and iqr > NOISY_RELATIVE_IQR * median)


def noise_note(rows: list[dict[str, Any]], what: str) -> list[str]:
    """A Markdown note naming the noisy rows, if any (their ``noisy`` flag is set)."""
    noisy = [
        f"{row['preset']}" + (f" B={row['batch_size']}" if "ttft_s" in row else "") for row in rows if row.get("noisy")
    ]
    if not noisy:
        return []
    load = rows[0].get("machine", {})
    return [
        f"NOISY: {', '.join(noisy)}: {what} IQR > {NOISY_RELATIVE_IQR:.0%} of the median (load average "
        f"{load.get('load_average_start')} -> {load.get('load_average_end')}); other jobs were competing for the "
        "machine. Compare the *_min_s columns of the JSON (interference only adds time) or re-run on a quiet machine."
    ]


def round_robin(items: Sequence[Any], rounds: int) -> Iterator[tuple[int, Any]]:
    """``(round, item)`` for ``rounds`` passes over ``items``, each pass starting one item later.

    Interleaving spreads slow drift of the machine (thermals, other jobs) over all items alike, and
    the rotation keeps any "first after a switch" effect from always hitting the same item.
    """
    for number in range(rounds):
        shift = number % len(items) if items else 0
        for item in [*items[shift:], *items[:shift]]:
            yield number, item


# ----- presets -----
def preset_label(spec: str) -> str:
    """Row label of a ``--presets`` entry: the preset name, or a YAML file's stem."""
    spec = spec.strip()
    if spec.endswith((".yaml", ".yml")) or "/" in spec or os.sep in spec:
        return Path(spec).stem
    return spec or "none"


def parse_list(text: str, cast: Callable[[str], Any] = str) -> list[Any]:
    """Comma-separated CLI list (``"none,duet_192"``, ``"1,8"``), empty items dropped."""
    return [cast(item.strip()) for item in text.split(",") if item.strip()]


# ----- machine -----
def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """1/5/15-minute load averages (``None`` where the OS has none): other jobs skew CPU timings."""
    return [round(value, 2) for value in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info(
    device: torch.device, dtype: torch.dtype, attn_implementation: str, load_at_start: list[float] | None = None
) -> dict[str, Any]:
    """What the numbers were measured on: device, library versions, dtype, attention kernel, threads, load."""
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "flash_attn": _version("flash-attn"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "dtype": dtype_name(dtype),
        "attn_implementation": attn_implementation,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_start": load_at_start,
        "load_average_end": load_average(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_memory_gb"] = round(props.total_memory / 2**30, 1)
    return info


# ----- outputs -----
def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def write_json(rows: list[dict[str, Any]], path: Path) -> None:
    """Rows as a JSON list (non-finite numbers become ``null``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(rows), indent=2) + "\n", encoding="utf-8")


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        magnitude = abs(value)
        if magnitude != 0 and (magnitude < 0.01 or magnitude >= 1e5):
            return f"{value:.3g}"
        return f"{value:.3f}" if magnitude < 10 else f"{value:.1f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table of ``rows``; ``columns`` are ``(key, header)`` pairs."""
    header = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = [header, rule]
    for row in rows:
        lines.append("| " + " | ".join(_format(row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines)


def write_markdown(
    rows: list[dict[str, Any]], columns: Sequence[tuple[str, str]], path: Path, title: str, notes: Sequence[str] = ()
) -> str:
    """Write ``title``, a machine line, the table and ``notes`` to ``path``; returns the table."""
    table = markdown_table(rows, columns)
    lines = [f"# {title}", ""]
    if rows and "machine" in rows[0]:
        machine = rows[0]["machine"]
        lines += [
            f"Machine: {machine.get('device_name')} ({machine.get('device')}), torch {machine.get('torch')}, "
            f"transformers {machine.get('transformers')}, dtype {machine.get('dtype')}, "
            f"attention {machine.get('attn_implementation')}, {machine.get('torch_threads')} threads.",
            "",
        ]
    lines += [table, ""]
    lines += [f"- {note}" for note in notes]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return table


def plot_ratios(
    groups: Sequence[str],
    measured: Sequence[float],
    predicted: Sequence[float],
    path: Path,
    title: str,
    ylabel: str,
) -> bool:
    """Grouped bars: measured vs FLOP-model ratio per preset (1.0 = baseline), written as a PNG.

    Returns whether it was written: without matplotlib (GPU nodes often lack it) the chart is skipped with a
    logged note, so the JSON and Markdown rows never depend on it.
    """
    plt = _pyplot()
    if plt is None:
        logger.info("matplotlib is not installed: %s not written (the JSON and Markdown rows are)", path)
        return False
    positions = list(range(len(groups)))
    width = 0.38
    figure, axes = plt.subplots(figsize=(max(5.0, 1.3 * len(groups) + 2), 3.8))
    clean = [value if value is not None and math.isfinite(value) else 0.0 for value in measured]
    ideal = [value if value is not None and math.isfinite(value) else 0.0 for value in predicted]
    bars = axes.bar([p - width / 2 for p in positions], clean, width, label="measured", color="#3b75af")
    axes.bar([p + width / 2 for p in positions], ideal, width, label="FLOP model", color="#f39c3c")
    for bar, value in zip(bars, clean, strict=True):
        axes.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                      va="bottom", fontsize=8)  # fmt: skip
    axes.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    axes.set_xticks(positions)
    axes.set_xticklabels(groups, rotation=20 if len(groups) > 5 else 0, ha="right" if len(groups) > 5 else "center")
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, imported on first use; ``None`` when it is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_report(
    rows: list[dict[str, Any]],
    out: str | Path,
    title: str,
    columns: Sequence[tuple[str, str]],
    notes: Sequence[str],
    labels: Sequence[str],
    ylabel: str,
) -> str:
    """``FILE.json`` rows, ``FILE.md`` table (with notes) and ``FILE.png`` measured-vs-FLOP-model chart (when
    matplotlib is installed)."""
    json_path, md_path, png_path = output_paths(out)
    write_json(rows, json_path)
    table = write_markdown(rows, columns, md_path, title, notes)
    plot_ratios(
        labels,
        [row["ratio_vs_none"] for row in rows],
        [row["flops_ratio_vs_none"] for row in rows],
        png_path,
        title + f"\n{rows[0]['machine']['device_name']}",
        ylabel,
    )
    return table


def output_paths(out: str | Path) -> tuple[Path, Path, Path]:
    """``FILE.json``, ``FILE.md``, ``FILE.png`` for ``--out FILE.json`` (any suffix is replaced)."""
    path = Path(out)
    if path.suffix != ".json":
        path = path.with_suffix(".json")
    return path, path.with_suffix(".md"), path.with_suffix(".png")
