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

Which differences are real (:mod:`llava.eval.stats`): each score gets a 95 % bootstrap interval over
questions (``--ci-resamples``, ``--alpha``) and each row's score a paired test against the baseline's on the
same questions (exact McNemar for right/wrong scores, a paired bootstrap otherwise), its p-value shown with
``≈`` when the difference is not significant at ``--alpha``; the average retained gets an interval too.
Per-question scores come from the recorded answers, each scored alone by the benchmark's own metric (read
from the result's data root). A benchmark whose headline is not a mean over questions is resampled on its
own units instead (its ``resampling_units``, a :class:`llava.eval.stats.UnitStatistic`): POPE's questions
within each split with the F1s recomputed, MME's question pairs within each perception subtask with acc +
acc+ recomputed, MMBench's question groups (CircularEval) scored 0/100; the row's test against the baseline
is then a paired bootstrap of the headline difference on the same resampled units (McNemar over MMBench's
groups). A result whose headline cannot be reproduced either way gets no interval and no test, and the
notes say why. ``--seeds 0,1,2``
evaluates the presets whose name starts with ``random`` once per seed (``llava.eval.run --seed``, answers
under ``<out>/<label>/seed-<s>/``) and reports their mean ± sample std over seeds, the per-seed values in
``table.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from llava.eval import run as run_cli
from llava.eval import stats
from llava.eval.answers import read_answers
from llava.eval.base import EvalDataError, EvalItem
from llava.eval.registry import get_benchmark
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


SEED_FOLDER = "seed-{}"
"""Where ``--seeds`` puts one seed's runs of the random presets: ``<out>/<label>/seed-<s>/<preset>/<benchmark>``."""

COUNTED: dict[str, Callable[[EvalItem], bool]] = {"sqa": lambda item: bool(item.reference.get("has_image"))}
"""Benchmarks whose headline counts only some questions: which ones (ScienceQA: the image questions)."""


def is_seeded(preset: str) -> bool:
    """Whether ``--seeds`` repeats the preset: random-choice presets (``random_64``, ...)."""
    return run_cli.preset_label(preset).startswith("random")


def collect_results(
    out: Path,
    models: Sequence[tuple[str, Sequence[str]]],
    benchmarks: Sequence[str],
    seeds: Sequence[int] = (),
    root: str | None = None,
    per_question: bool = True,
) -> list[dict]:
    """Every ``result.json`` of ``out/<model>/<preset>/<benchmark>/`` for ``(model, presets)`` pairs (missing
    ones are reported and skipped); with ``seeds``, the random presets' from each seed's folder (``repeat_seed``
    set to the seed).
    With ``per_question``, each result gets ``question_scores`` (:func:`question_scores`: per-question scores
    or the benchmark's units, ``None`` when neither can be had, ``question_scores_note`` saying why)."""
    results = []
    loaded: dict[tuple[str, str], Any] = {}
    for model, presets in models:
        for preset in presets:
            runs = [(seed, out / model / SEED_FOLDER.format(seed)) for seed in seeds] if is_seeded(preset) else []
            for seed, base in runs or [(None, out / model)]:
                for benchmark in benchmarks:
                    folder = base / preset / benchmark
                    if not (folder / RESULT_FILE).is_file():
                        logger.warning("no result for %s / %s / %s (%s)", model, preset, benchmark, folder)
                        continue
                    result = {**json.loads((folder / RESULT_FILE).read_text(encoding="utf-8")), "checkpoint": model}
                    if seed is not None:
                        if result.get("seed", seed) != seed:
                            logger.warning(
                                "%s: recorded seed %s, not %s as its folder says", folder, result["seed"], seed
                            )
                        result["repeat_seed"] = seed
                    if per_question:
                        result["question_scores"], note = question_scores(result, folder, root, loaded)
                        result["question_scores_note"] = note
                    results.append(result)
    return results


def question_scores(
    result: Mapping[str, Any], folder: Path, root: str | None = None, loaded: dict[tuple[str, str], Any] | None = None
) -> tuple[stats.Scores | None, str | None]:
    """``(question id -> score, None)`` for a result whose headline is the mean of its questions' scores,
    ``(UnitStatistic, None)`` for a benchmark that resamples its own units, else ``(None, why)``.

    A benchmark with ``resampling_units(items, predictions, protocol)`` (POPE, MME, MMBench) gives its
    :class:`llava.eval.stats.UnitStatistic` of the recorded answers (``answers-*.jsonl``). Otherwise each
    answered question is scored alone by the benchmark's metric under the result's protocol, on the
    questions loaded from the result's data root (``root`` when that is gone). Either is kept only when it
    reproduces the recorded score (the mean of the scores, or the units' headline ``H``, to 1e-6).
    ``loaded`` caches the questions per (benchmark, root).
    """
    name = result["benchmark"]
    if result.get("score") is None:
        return None, "no local score"
    recorded = result.get("root")
    data_root = recorded if recorded and Path(recorded).is_dir() else root
    if data_root is None:
        return None, "no data root recorded"
    loaded = {} if loaded is None else loaded
    try:
        key = (name, str(data_root))
        if key not in loaded:
            benchmark = get_benchmark(name)
            loaded[key] = (benchmark, benchmark.load(Path(data_root), folder.parents[1] / ".cache" / name))
        benchmark, items = loaded[key]
        answers = read_answers(folder)
        counted = COUNTED.get(name, lambda item: True)
        protocol = result.get("protocol") or "official"
        if hasattr(benchmark, "resampling_units"):
            predictions = {question_id: answer["text"] for question_id, answer in answers.items()}
            units = benchmark.resampling_units(items, predictions, protocol=protocol)
            return _reproduced(units, result["score"])
        scores = {}
        for item in items:
            if item.question_id in answers and counted(item):
                prediction = {item.question_id: answers[item.question_id]["text"]}
                alone = benchmark.score([item], prediction, protocol=protocol)
                if alone.num_scored == 1 and not math.isnan(alone.score):
                    scores[item.question_id] = float(alone.score)
    except (EvalDataError, OSError, KeyError, TypeError, ValueError) as error:
        logger.warning("%s: no per-question scores (%s)", folder, error)
        return None, f"questions or answers unreadable ({error})"
    if not scores:
        return None, "no question scored"
    if not math.isclose(statistics.fmean(scores.values()), result["score"], rel_tol=1e-6, abs_tol=1e-6):
        return None, "headline is not a mean over questions"
    return scores, None


def _reproduced(units: stats.UnitStatistic | None, recorded: float) -> tuple[stats.UnitStatistic | None, str | None]:
    """``(units, None)`` when their headline equals the recorded score (1e-6), else ``(None, why)``."""
    if units is None:
        return None, "no question scored"
    headline = units.value()
    if not math.isclose(headline, recorded, rel_tol=1e-6, abs_tol=1e-6):
        return None, f"headline not reproduced from its {units.unit}s ({headline:.6g}, recorded {recorded:.6g})"
    return units, None


def build_table(
    results: Sequence[dict[str, Any]],
    benchmarks: Sequence[str],
    baseline: tuple[str, str],
    train_seconds: Mapping[str, float] | None = None,
    *,
    n_resamples: int = stats.N_RESAMPLES,
    alpha: float = stats.ALPHA,
    ci_seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per (checkpoint, preset), in first-seen order, with each benchmark's score and % of the baseline.

    ``average_retained`` is the mean of the per-benchmark percentages over the benchmarks the row and the
    baseline both scored (``None`` when none); incomplete results are flagged and never averaged silently.
    ``train_seconds`` (checkpoint -> seconds) adds ``train_s`` and ``train_saved_percent`` (against the
    baseline's checkpoint) to that checkpoint's rows.

    Results with ``question_scores`` add to their cell ``ci`` (:func:`llava.eval.stats.bootstrap_ci`) and,
    off the baseline row, ``test`` (:func:`llava.eval.stats.paired_test` against the baseline's cell, only
    when both are complete), and to the row ``average_retained_ci`` (:func:`llava.eval.stats.retained_ci`,
    when every averaged benchmark has a test). Results whose ``question_scores`` are a benchmark's
    :class:`llava.eval.stats.UnitStatistic` get the same on its units, the cell adding ``unit`` and
    ``resampling`` (what is resampled, in words) and ``n`` counting units. Results with a ``repeat_seed`` (one
    per seed) make a cell whose ``score`` is the mean over seeds, ``seeds`` the
    :func:`llava.eval.stats.seed_summary`, and whose per-question scores are averaged over the seeds (units:
    the mean of the seeds' headlines, every seed resampled with the same units).
    """
    train_seconds = dict(train_seconds or {})
    base_train = train_seconds.get(baseline[0])
    check_one_protocol(results)
    by_key: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = {}
    for result in results:
        group = by_key.setdefault((result["checkpoint"], result["preset"]), {}).setdefault(result["benchmark"], [])
        if result.get("repeat_seed") is None:
            group.clear()  # one unseeded result per cell: the last one, as before
        group.append(result)
    if baseline not in by_key:
        raise ValueError(f"the baseline {baseline[0]}/{baseline[1]} has no results")
    vectors = {
        key: {name: _cell_questions(group, f"{key[0]}/{key[1]} {name}") for name, group in per_benchmark.items()}
        for key, per_benchmark in by_key.items()
    }
    base = {name: _cell(group) for name, group in by_key[baseline].items()}
    rows = []
    for (checkpoint, preset), per_benchmark in by_key.items():
        row: dict[str, Any] = {"checkpoint": checkpoint, "preset": preset, "cells": {}, "incomplete": []}
        retained, tokens, prefill, pairs = [], [], [], []
        for name in benchmarks:
            result = _cell(per_benchmark.get(name, []))
            if result is None or result["score"] is None:
                continue
            cell = {"score": result["score"], "retained": None, "protocol": result.get("protocol") or "unrecorded"}
            if "seeds" in result:
                cell["seeds"] = result["seeds"]
            questions, base_questions = vectors[(checkpoint, preset)].get(name), vectors[baseline].get(name)
            if questions is not None:
                cell["ci"] = list(stats.bootstrap_ci(questions, n_resamples, alpha, ci_seed))
                cell["n"] = len(questions)
                if isinstance(questions, stats.UnitStatistic):
                    cell.update(unit=questions.unit, resampling=questions.description)
            reference = base.get(name)
            if reference is not None and reference["score"]:
                cell["retained"] = 100.0 * result["score"] / reference["score"]
                retained.append(cell["retained"])
                both_complete = result["complete"] and reference["complete"]
                if questions is not None and base_questions is not None and both_complete:
                    pairs.append((questions, base_questions))
                    if (checkpoint, preset) != baseline:
                        what = f"{checkpoint}/{preset} against {baseline[0]}/{baseline[1]} on {name}"
                        cell["test"] = stats.paired_test(questions, base_questions, n_resamples, alpha, ci_seed, what)
            if not result["complete"]:
                row["incomplete"].append(f"{name} ({result['num_scored']}/{result['num_questions']})")
            row["cells"][name] = cell
            if result.get("visual_tokens_per_layer") is not None:
                tokens.append(result["visual_tokens_per_layer"])
            if result["num_scored"]:
                prefill.append(1000.0 * result["prefill_s"] / result["num_scored"])
        row["average_retained"] = statistics.mean(retained) if retained else None
        if retained and len(pairs) == len(retained):
            row["average_retained_ci"] = list(stats.retained_ci(pairs, n_resamples, alpha, ci_seed))
        row["train_s"] = train_seconds.get(checkpoint)
        row["train_saved_percent"] = None
        if row["train_s"] is not None and base_train:
            row["train_saved_percent"] = 100.0 * (1.0 - row["train_s"] / base_train)
        row["visual_tokens_per_layer"] = statistics.mean(tokens) if tokens else None
        row["prefill_ms_per_question"] = statistics.mean(prefill) if prefill else None
        rows.append(row)
    return rows


def _cell(group: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """One benchmark's result of a row; several seeds' results merged (mean score over the seeds with a
    score, ``seeds`` summary, complete when all are, counts and times summed)."""
    if not group:
        return None
    if len(group) == 1 and group[0].get("repeat_seed") is None:
        return group[0]
    scored = {result["repeat_seed"]: result["score"] for result in group if result["score"] is not None}
    summary = stats.seed_summary(scored) if scored else None
    return {
        **group[0],
        "score": summary["mean"] if summary else None,
        "seeds": summary,
        "complete": all(result["complete"] for result in group),
        "num_scored": sum(result["num_scored"] for result in group),
        "num_questions": sum(result["num_questions"] for result in group),
        "prefill_s": sum(result["prefill_s"] for result in group),
        "visual_tokens_per_layer": _mean_or_none([result.get("visual_tokens_per_layer") for result in group]),
    }


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.mean(present) if present else None


def _cell_questions(group: Sequence[dict[str, Any]], what: str) -> stats.Scores | None:
    """The cell's per-question scores (averaged over seeds) or units (stacked over seeds), or ``None`` when
    one of its results has none."""
    scores = [result.get("question_scores") for result in group if result["score"] is not None]
    if not scores or any(found is None for found in scores):
        return None
    if len(scores) > 1 and not all(result["complete"] for result in group):
        return None  # seeds that answered different questions: nothing to pair
    if len(scores) == 1:
        return scores[0]
    if all(isinstance(found, stats.UnitStatistic) for found in scores):
        return stats.UnitStatistic.over_seeds(scores, what)
    return stats.mean_over_seeds(scores, what)


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


def _p_value(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def _interval(interval: Sequence[float] | None) -> str:
    return "" if not interval else f" [{interval[0]:.1f}, {interval[1]:.1f}]"


def render_cell(cell: Mapping[str, Any]) -> str:
    """``score[ ± std over seeds][ [CI]] (% of baseline)[ ≈] [p=...]``: the parts a cell has."""
    text = f"{cell['score']:.1f}"
    seeds = cell.get("seeds")
    if seeds and seeds.get("std") is not None:
        text += f" ± {seeds['std']:.1f}"
    text += f"{_interval(cell.get('ci'))} ({_number(cell['retained'])} %)"
    test = cell.get("test")
    if test:
        text += f"{'' if test['significant'] else ' ≈'} {_p_value(test['p_value'])}"
    return text


def render_markdown(
    rows: Sequence[dict[str, Any]],
    benchmarks: Sequence[str],
    baseline: tuple[str, str],
    *,
    alpha: float = stats.ALPHA,
    n_resamples: int = stats.N_RESAMPLES,
    missing: Mapping[str, str] | None = None,
) -> str:
    """The table: score [CI] (% of baseline) and the test against the baseline per benchmark, average retained
    [CI], tokens per layer, prefill ms. ``missing`` (benchmark -> why) names benchmarks without intervals."""
    with_train = any(row.get("train_s") is not None for row in rows)
    header = ["checkpoint", "preset", *benchmarks, "avg retained %", "visual tok/layer", "prefill ms/question"]
    if with_train:
        header += ["train time s", "train time saved %"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = []
        for name in benchmarks:
            cell = row["cells"].get(name)
            cells.append("-" if cell is None else render_cell(cell))
        average = _number(row["average_retained"]) + _interval(row.get("average_retained_ci"))
        values = [row["checkpoint"], row["preset"], *cells, average,
                  _number(row["visual_tokens_per_layer"]), _number(row["prefill_ms_per_question"], 2)]  # fmt: skip
        if with_train:
            values += [_number(row.get("train_s"), 0), _number(row.get("train_saved_percent"))]
        lines.append("| " + " | ".join(values) + " |")
    notes = [
        f"Cells: score (% of {baseline[0]}/{baseline[1]}). Average retained = mean of the percentages over the "
        "benchmarks (DUET-VLM's Avg%). Visual tokens per layer and prefill time are measured during the run."
    ]
    cells_all = [cell for row in rows for cell in row["cells"].values()]
    if any(cell.get("ci") for cell in cells_all):
        level = f"{100 * (1 - alpha):g} %"
        notes.append(
            f"[a, b]: {level} percentile bootstrap interval over questions ({n_resamples} resamples); on the average "
            "retained, questions resampled within each benchmark (row and baseline paired), then the mean of the "
            f"per-benchmark % retained. p: paired test against {baseline[0]}/{baseline[1]} on the same questions "
            f"(exact McNemar for right/wrong scores, paired bootstrap otherwise); ≈ = not significant at {alpha:g} "
            "(the difference may be noise)."
        )
    resampled = {
        name: cell["resampling"] for row in rows for name, cell in row["cells"].items() if "resampling" in cell
    }
    if resampled:
        notes.append(
            "Headline not a mean over questions, so resampled on the benchmark's own units with the headline "
            "recomputed per resample (row and baseline on the same units; p: paired bootstrap of the headline "
            "difference, McNemar when the units score right/wrong): "
            + "; ".join(f"{name}: {resampled[name]}" for name in benchmarks if name in resampled)
        )
    seeded = sorted({seed for cell in cells_all if cell.get("seeds") for seed in cell["seeds"]["values"]}, key=int)
    if seeded:
        notes.append(
            f"Random presets over seeds {','.join(seeded)}: mean ± sample std (min..max and per-seed values in "
            "table.json); interval and test on the per-question scores averaged over the seeds."
        )
    if missing:
        notes.append(
            "No interval or test: "
            + "; ".join(f"{name} ({why})" for name, why in missing.items() if name in benchmarks)
        )
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


def missing_intervals(results: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Benchmark -> why (the first reason seen) for results whose per-question scores could not be had."""
    missing: dict[str, str] = {}
    for result in results:
        if "question_scores" in result and result["question_scores"] is None:
            missing.setdefault(result["benchmark"], result.get("question_scores_note") or "no per-question scores")
    return missing


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


def write_table(
    rows: Sequence[dict[str, Any]],
    benchmarks: Sequence[str],
    baseline: tuple[str, str],
    out: Path,
    *,
    alpha: float = stats.ALPHA,
    n_resamples: int = stats.N_RESAMPLES,
    seeds: Sequence[int] = (),
    missing: Mapping[str, str] | None = None,
) -> str:
    """``table.md``, ``table.json`` and ``table.png`` under ``out``; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(rows, benchmarks, baseline, alpha=alpha, n_resamples=n_resamples, missing=missing)
    (out / "table.md").write_text(markdown, encoding="utf-8")
    payload = {"baseline": list(baseline), "benchmarks": list(benchmarks), "rows": list(rows), "alpha": alpha,
               "ci_resamples": n_resamples, "seeds": list(seeds), "no_interval": dict(missing or {})}  # fmt: skip
    (out / "table.json").write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    plot(rows, out / "table.png")
    return markdown


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Evaluate every checkpoint x preset x benchmark (resuming), then write and print the table."""
    # no abbreviations: the runner's options pass through (``--seed`` must not be read as ``--seeds``)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
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
    parser.add_argument(
        "--seeds", default=None, help="e.g. 0,1,2: run presets named random* once per seed (mean ± std over seeds)"
    )
    parser.add_argument("--ci-resamples", type=int, default=stats.N_RESAMPLES, help="bootstrap resamples")
    parser.add_argument("--alpha", type=float, default=stats.ALPHA, help="level: (1-alpha) intervals, p < alpha")
    parser.add_argument("--ci-seed", type=int, default=0, help="seed of the bootstrap resampling")
    args, run_args = parser.parse_known_args(argv)
    if args.ci_resamples < 1 or not 0.0 < args.alpha < 1.0:
        parser.error("--ci-resamples must be >= 1 and --alpha in (0, 1)")
    try:
        seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()] if args.seeds else []
    except ValueError:
        parser.error(f"--seeds expects comma-separated integers, got {args.seeds!r}")
    if len(set(seeds)) != len(seeds):
        parser.error(f"--seeds must differ, got {args.seeds}")
    if seeds and any(arg == "--seed" or arg.startswith("--seed=") for arg in run_args):
        parser.error("--seeds and --seed go separately: --seeds sets each random preset's seed")
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
            once = [preset for preset in model_presets if not (seeds and is_seeded(preset))]
            repeated = [preset for preset in model_presets if seeds and is_seeded(preset)]
            common = ["--model", path, "--root", args.root, "--benchmarks", ",".join(benchmarks)]
            if once:
                run_cli.main([*common, "--presets", ",".join(once), "--out", str(out / label), *run_args])
            for seed in seeds if repeated else []:
                run_cli.main([*common, "--presets", ",".join(repeated), "--out",
                              str(out / label / SEED_FOLDER.format(seed)), "--seed", str(seed), *run_args])  # fmt: skip
    wanted = [(label, [run_cli.preset_label(p) for p in model_presets]) for label, _, model_presets in per_model]
    results = collect_results(out, wanted, benchmarks, seeds, args.root)
    rows = build_table(
        results, benchmarks, baseline, parse_train_times(args.train_time),
        n_resamples=args.ci_resamples, alpha=args.alpha, ci_seed=args.ci_seed,
    )  # fmt: skip
    print(write_table(rows, benchmarks, baseline, out, alpha=args.alpha, n_resamples=args.ci_resamples, seeds=seeds,
                      missing=missing_intervals(results)))  # fmt: skip
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
