"""The paper's table in one command: accuracy retained per compression preset (and per checkpoint).

    python -m llava.eval.compare --model runs/llava-v1.5-7b --root playground/data/eval \\
        --benchmarks textvqa,gqa,mme,pope,sqa --presets none,duet_192,duet_128,duet_64,visionzip_64,pdrop_64 \\
        --out runs/eval/compare

Runs :mod:`llava.eval.run` for every checkpoint (answers resume; finished ones are not generated again),
then writes ``table.md``, ``table.json`` and ``table.png``: a row per checkpoint and preset, a column per
benchmark holding the score and its % of the baseline's (the first checkpoint's ``none`` row unless
``--baseline`` says otherwise), the average retained (the mean of those percentages, as DUET-VLM and its
peers compute it), visual tokens per LLM layer and the measured prefill time per question.
``--model label=path`` names a checkpoint and ``label=path@preset1,preset2`` gives it its own presets (e.g.
a model trained with ``duet_64`` evaluated only at ``duet_64``); ``--train-time label=metrics.jsonl[,...]``
adds each checkpoint's measured training time (the trainer's ``train_runtime``, summed over the stages'
``metrics.jsonl``) and the time saved against the baseline's checkpoint; ``--results-only`` builds the
table from existing results.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llava.eval import run as run_cli
from llava.eval.runner import RESULT_FILE

logger = logging.getLogger(__name__)


def parse_models(specs: Sequence[str]) -> list[tuple[str, str, list[str] | None]]:
    """``label=path[@presets]`` or ``path[@presets]`` (labelled by its folder name) -> ``[(label, path, presets)]``
    (``presets`` is ``None`` when the spec names none: the command's ``--presets`` apply); labels must differ."""
    models = []
    for spec in specs:
        spec, _, preset_list = spec.partition("@")
        label, _, path = spec.partition("=") if "=" in spec else (Path(spec).name, "", spec)
        presets = [name for name in preset_list.split(",") if name] or None
        models.append((label, path, presets))
    labels = [label for label, _, _ in models]
    if len(set(labels)) != len(labels):
        raise ValueError(f"checkpoint labels must differ, got {labels}; name them with label=path")
    return models


def training_seconds(metrics_files: Sequence[Path]) -> float:
    """Sum of the trainer's ``train_runtime`` over training stages' ``metrics.jsonl`` (the last value in each);
    ValueError naming a file that has none (a run that did not finish)."""
    total = 0.0
    for path in metrics_files:
        runtime = None
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line) if line.strip() else {}
                if "train_runtime" in record:
                    runtime = float(record["train_runtime"])
        if runtime is None:
            raise ValueError(f"{path}: no train_runtime (the run did not finish)")
        total += runtime
    return total


def parse_train_times(specs: Sequence[str]) -> dict[str, float]:
    """``label=metrics.jsonl[,metrics.jsonl...]`` -> ``{label: training seconds}``."""
    times = {}
    for spec in specs:
        label, sep, files = spec.partition("=")
        if not sep or not files:
            raise ValueError(f"--train-time expects label=metrics.jsonl[,...], got {spec!r}")
        times[label] = training_seconds([Path(name) for name in files.split(",") if name])
    return times


def collect_results(out: Path, models: Sequence[tuple[str, Sequence[str]]], benchmarks: Sequence[str]) -> list[dict]:
    """Every ``result.json`` of ``out/<model>/<preset>/<benchmark>/`` for ``(model, presets)`` pairs (missing
    ones are reported and skipped)."""
    results = []
    for model, presets in models:
        for preset in presets:
            for benchmark in benchmarks:
                path = out / model / preset / benchmark / RESULT_FILE
                if not path.is_file():
                    logger.warning("no result for %s / %s / %s (%s)", model, preset, benchmark, path)
                    continue
                results.append({**json.loads(path.read_text(encoding="utf-8")), "checkpoint": model})
    return results


def build_table(
    results: Sequence[dict[str, Any]],
    benchmarks: Sequence[str],
    baseline: tuple[str, str],
    train_seconds: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """One row per (checkpoint, preset), in first-seen order, with each benchmark's score and % of the baseline.

    ``average_retained`` is the mean of the per-benchmark percentages over the benchmarks the row and the
    baseline both scored (``None`` when none); incomplete results are flagged and never averaged silently.
    ``train_seconds`` (checkpoint -> seconds) adds ``train_s`` and ``train_saved_percent`` (against the
    baseline's checkpoint) to that checkpoint's rows.
    """
    train_seconds = dict(train_seconds or {})
    base_train = train_seconds.get(baseline[0])
    check_one_protocol(results)
    by_key: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for result in results:
        by_key.setdefault((result["checkpoint"], result["preset"]), {})[result["benchmark"]] = result
    if baseline not in by_key:
        raise ValueError(f"the baseline {baseline[0]}/{baseline[1]} has no results")
    base = by_key[baseline]
    rows = []
    for (checkpoint, preset), per_benchmark in by_key.items():
        row: dict[str, Any] = {"checkpoint": checkpoint, "preset": preset, "cells": {}, "incomplete": []}
        retained, tokens, prefill = [], [], []
        for name in benchmarks:
            result = per_benchmark.get(name)
            if result is None or result["score"] is None:
                continue
            cell = {"score": result["score"], "retained": None, "protocol": result.get("protocol") or "unrecorded"}
            reference = base.get(name)
            if reference is not None and reference["score"]:
                cell["retained"] = 100.0 * result["score"] / reference["score"]
                retained.append(cell["retained"])
            if not result["complete"]:
                row["incomplete"].append(f"{name} ({result['num_scored']}/{result['num_questions']})")
            row["cells"][name] = cell
            if result.get("visual_tokens_per_layer") is not None:
                tokens.append(result["visual_tokens_per_layer"])
            if result["num_scored"]:
                prefill.append(1000.0 * result["prefill_s"] / result["num_scored"])
        row["average_retained"] = statistics.mean(retained) if retained else None
        row["train_s"] = train_seconds.get(checkpoint)
        row["train_saved_percent"] = None
        if row["train_s"] is not None and base_train:
            row["train_saved_percent"] = 100.0 * (1.0 - row["train_s"] / base_train)
        row["visual_tokens_per_layer"] = statistics.mean(tokens) if tokens else None
        row["prefill_ms_per_question"] = statistics.mean(prefill) if prefill else None
        rows.append(row)
    return rows


def check_one_protocol(results: Sequence[dict[str, Any]]) -> None:
    """ValueError when one benchmark's results were scored under different protocols (``official`` and
    ``strict``, or results from before protocols were recorded): their percentages would not compare."""
    seen: dict[str, dict[str, str]] = {}
    for result in results:
        protocol = result.get("protocol") or "unrecorded"
        seen.setdefault(result["benchmark"], {}).setdefault(protocol, f"{result['checkpoint']}/{result['preset']}")
    mixed = {name: found for name, found in seen.items() if len(found) > 1}
    if mixed:
        details = "; ".join(
            f"{name}: " + ", ".join(f"{protocol} ({where})" for protocol, where in found.items())
            for name, found in mixed.items()
        )
        raise ValueError(
            f"results scored under different protocols: {details}; rescore them alike with "
            "python -m llava.eval.run --score-only --protocol official|strict"
        )


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_markdown(rows: Sequence[dict[str, Any]], benchmarks: Sequence[str], baseline: tuple[str, str]) -> str:
    """The table: score (% of baseline) per benchmark, average retained, tokens per layer, prefill ms."""
    with_train = any(row.get("train_s") is not None for row in rows)
    header = ["checkpoint", "preset", *benchmarks, "avg retained %", "visual tok/layer", "prefill ms/question"]
    if with_train:
        header += ["train time s", "train time saved %"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = []
        for name in benchmarks:
            cell = row["cells"].get(name)
            cells.append("-" if cell is None else f"{cell['score']:.1f} ({_number(cell['retained'])} %)")
        values = [row["checkpoint"], row["preset"], *cells, _number(row["average_retained"]),
                  _number(row["visual_tokens_per_layer"]), _number(row["prefill_ms_per_question"], 2)]  # fmt: skip
        if with_train:
            values += [_number(row.get("train_s"), 0), _number(row.get("train_saved_percent"))]
        lines.append("| " + " | ".join(values) + " |")
    notes = [
        f"Cells: score (% of {baseline[0]}/{baseline[1]}). Average retained = mean of the percentages over the "
        "benchmarks (DUET-VLM's Avg%). Visual tokens per layer and prefill time are measured during the run."
    ]
    protocols = {name: cell["protocol"] for row in rows for name, cell in row["cells"].items()}
    if protocols:
        notes.append(
            "Scoring protocol (llava.eval.run --protocol): "
            + ", ".join(f"{name} {protocols[name]}" for name in benchmarks if name in protocols)
        )
    if with_train:
        notes.append(
            "Train time: the trainer's train_runtime summed over the checkpoint's training stages (launch and "
            f"model loading excluded); saved = 1 - time / time of {baseline[0]}."
        )
    incomplete = [
        f"{row['checkpoint']}/{row['preset']}: {', '.join(row['incomplete'])}" for row in rows if row["incomplete"]
    ]
    if incomplete:
        notes.append("INCOMPLETE (scored/questions): " + "; ".join(incomplete))
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Average retained against visual tokens per layer, one point per row; with training times, a second
    panel with each checkpoint's training time and the saving."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = {row["checkpoint"]: row for row in rows if row.get("train_s") is not None}
    figure, axes = plt.subplots(1, 2 if trained else 1, figsize=(11 if trained else 6, 4), squeeze=False)
    axis = axes[0][0]
    for row in rows:
        if row["average_retained"] is None or row["visual_tokens_per_layer"] is None:
            continue
        axis.scatter(row["visual_tokens_per_layer"], row["average_retained"])
        axis.annotate(f"{row['checkpoint']}/{row['preset']}", (row["visual_tokens_per_layer"], row["average_retained"]),
                      fontsize=7, textcoords="offset points", xytext=(3, 3))  # fmt: skip
    axis.set_xlabel("visual tokens per LLM layer")
    axis.set_ylabel("average accuracy retained (%)")
    axis.grid(alpha=0.3)
    if trained:
        bars = axes[0][1]
        labels = list(trained)
        seconds = [trained[label]["train_s"] for label in labels]
        bars.bar(labels, seconds, color="tab:blue")
        for index, label in enumerate(labels):
            saved = trained[label]["train_saved_percent"]
            note = f"{seconds[index]:.0f} s" + ("" if saved is None else f" ({saved:+.1f} % saved)")
            bars.annotate(note, (index, seconds[index]), ha="center", fontsize=8, textcoords="offset points",
                          xytext=(0, 3))  # fmt: skip
        bars.set_ylabel("training time (s)")
        bars.set_title("measured training time", fontsize=9)
        bars.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_table(rows: Sequence[dict[str, Any]], benchmarks: Sequence[str], baseline: tuple[str, str], out: Path) -> str:
    """``table.md``, ``table.json`` and ``table.png`` under ``out``; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(rows, benchmarks, baseline)
    (out / "table.md").write_text(markdown, encoding="utf-8")
    payload = {"baseline": list(baseline), "benchmarks": list(benchmarks), "rows": list(rows)}
    (out / "table.json").write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    plot(rows, out / "table.png")
    return markdown


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Evaluate every checkpoint x preset x benchmark (resuming), then write and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="checkpoint, or label=checkpoint (repeat)")
    parser.add_argument("--benchmarks", default="textvqa,gqa,mme,pope,sqa")
    parser.add_argument("--presets", default="none,duet_192,duet_128,duet_64")
    parser.add_argument("--root", default="playground/data/eval")
    parser.add_argument("--out", default="runs/eval/compare")
    parser.add_argument("--baseline", default=None, help="label/preset of the 100 %% row (default: first model/none)")
    parser.add_argument("--results-only", action="store_true", help="build the table from existing results")
    parser.add_argument(
        "--train-time",
        action="append",
        default=[],
        help="label=metrics.jsonl[,metrics.jsonl]: the checkpoint's training time from its stages' metrics (repeat)",
    )
    args, run_args = parser.parse_known_args(argv)
    models = parse_models(args.model)
    benchmarks = [name for name in args.benchmarks.split(",") if name]
    presets = [name for name in args.presets.split(",") if name]
    per_model = [(label, path, model_presets or presets) for label, path, model_presets in models]
    first_labels = [run_cli.preset_label(preset) for preset in per_model[0][2]]
    default_preset = "none" if "none" in first_labels else first_labels[0]
    baseline = tuple(args.baseline.split("/", 1)) if args.baseline else (models[0][0], default_preset)
    out = Path(args.out)
    if not args.results_only:
        for label, path, model_presets in per_model:
            run_cli.main(["--model", path, "--root", args.root, "--benchmarks", ",".join(benchmarks), "--presets",
                          ",".join(model_presets), "--out", str(out / label), *run_args])  # fmt: skip
    wanted = [(label, [run_cli.preset_label(p) for p in model_presets]) for label, _, model_presets in per_model]
    rows = build_table(
        collect_results(out, wanted, benchmarks), benchmarks, baseline, parse_train_times(args.train_time)
    )
    print(write_table(rows, benchmarks, baseline, out))
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
