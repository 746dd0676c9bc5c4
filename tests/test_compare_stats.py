"""``llava.eval.stats`` on hand-computed cases, and ``llava.eval.compare --results-only`` with intervals, paired
tests and seeds on fabricated result folders (written by the runner's own scoring)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llava.eval import compare, stats
from llava.eval.answers import AnswerWriter, shard_file
from llava.eval.benchmarks.playground import PlaygroundScenes
from llava.eval.runner import score_folder


def test_mcnemar_exact_matches_the_binomial_formula():
    # b=8, c=2: m=10, p = 2 * (C(10,0) + C(10,1) + C(10,2)) / 2^10 = 2 * (1 + 10 + 45) / 1024 = 0.109375
    assert stats.mcnemar_exact(8, 2) == pytest.approx(0.109375, abs=1e-15)
    assert stats.mcnemar_exact(2, 8) == stats.mcnemar_exact(8, 2)
    # b=5, c=5: 2 * sum_{i<=5} C(10,i) / 1024 = 2 * 638 / 1024 > 1 -> 1
    assert stats.mcnemar_exact(5, 5) == 1.0 and stats.mcnemar_exact(0, 0) == 1.0
    # b=6, c=0: 2 * C(6,0) / 2^6 = 2 / 64 = 0.03125
    assert stats.mcnemar_exact(6, 0) == pytest.approx(0.03125)


def test_paired_test_uses_mcnemar_on_right_wrong_scores_matched_by_question_id():
    ids = [f"q{i}" for i in range(40)]
    base = {key: 100.0 if i < 20 else 0.0 for i, key in enumerate(ids)}
    row = dict(base)
    for key in ids[:8]:  # 8 right -> wrong (b counts row > base, so these are c)
        row[key] = 0.0
    for key in ids[20:22]:  # 2 wrong -> right
        row[key] = 100.0
    reordered = dict(reversed(list(row.items())))  # the order of the ids does not matter
    test = stats.paired_test(reordered, base)
    assert test["method"] == "mcnemar_exact" and test["discordant"] == [2, 8]
    assert test["p_value"] == pytest.approx(0.109375) and not test["significant"]
    assert test["difference"] == pytest.approx(-15.0) and test["n"] == 40


def test_bootstrap_ci_of_a_binary_vector_is_close_to_the_normal_interval():
    scores = np.r_[np.ones(240), np.zeros(160)]  # n = 400, p = 0.6
    low, high = stats.bootstrap_ci(scores, n_resamples=2000, seed=0)
    half = 1.959964 * math.sqrt(0.6 * 0.4 / 400)  # 0.0480
    assert low == pytest.approx(0.6 - half, abs=0.01) and high == pytest.approx(0.6 + half, abs=0.01)
    assert stats.bootstrap_ci(scores, seed=3) == stats.bootstrap_ci(scores, seed=3)  # deterministic per seed
    assert stats.bootstrap_ci(scores, seed=3) != stats.bootstrap_ci(scores, seed=4)


def test_paired_bootstrap_p_values():
    rng = np.random.default_rng(1)
    scores = {f"q{i}": float(value) for i, value in enumerate(rng.uniform(0, 100, size=200))}
    same = stats.paired_test(scores, dict(scores))
    assert same["method"] == "paired_bootstrap" and same["p_value"] == 1.0 and not same["significant"]
    assert stats.paired_bootstrap_p(np.asarray(list(scores.values())), np.asarray(list(scores.values()))) == 1.0
    shifted = {key: value + 10.0 + rng.normal() for key, value in scores.items()}
    test = stats.paired_test(shifted, scores)
    assert test["method"] == "paired_bootstrap" and test["p_value"] < 0.01 and test["significant"]
    assert stats.paired_test(shifted, scores) == test  # deterministic under the default seed


def test_seed_summary_and_mean_over_seeds():
    summary = stats.seed_summary({0: 50.0, 1: 52.0, 2: 57.0})
    # mean 53; std = sqrt(((50-53)^2 + (52-53)^2 + (57-53)^2) / 2) = sqrt(13)
    assert summary["mean"] == pytest.approx(53.0) and summary["std"] == pytest.approx(math.sqrt(13.0))
    assert (summary["min"], summary["max"], summary["values"]) == (50.0, 57.0, {"0": 50.0, "1": 52.0, "2": 57.0})
    assert stats.seed_summary({4: 1.0})["std"] is None
    assert stats.mean_over_seeds([{"a": 0.0, "b": 100.0}, {"a": 100.0, "b": 100.0}]) == {"a": 50.0, "b": 100.0}


def test_rows_over_different_questions_are_refused():
    with pytest.raises(ValueError, match=r"not cover the same questions: 1 of the baseline's .*\['q2'\]"):
        stats.paired_test({"q0": 1.0, "q1": 0.0}, {"q0": 1.0, "q1": 1.0, "q2": 0.0})
    with pytest.raises(ValueError, match="same questions"):
        stats.mean_over_seeds([{"a": 1.0}, {"b": 1.0}])


def test_retained_ci_brackets_the_average_and_is_exact_for_the_baseline():
    base = {f"q{i}": 100.0 if i < 300 else 0.0 for i in range(400)}  # 75
    row = {f"q{i}": 100.0 if i < 270 else 0.0 for i in range(400)}  # 67.5 -> 90 %
    low, high = stats.retained_ci([(row, base), (base, base)])  # (90 + 100) / 2 = 95
    assert low < 95.0 < high and high - low < 5.0
    assert stats.retained_ci([(base, base)]) == (100.0, 100.0)


# --- compare end to end -------------------------------------------------------------------------------------------

N = 400
RIGHT = 240  # the baseline answers the first 240 questions right: 60 %


def _playground(root: Path) -> list:
    folder = root / "playground"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "x.png").write_bytes(b"")  # the loader checks that it exists, never opens it
    lines = [
        json.dumps({"question_id": f"q{i:03d}", "image": "x.png", "text": "colour?", "answer": "red"}) for i in range(N)
    ]
    (folder / "questions.jsonl").write_text("\n".join(lines) + "\n")
    return PlaygroundScenes().load(root, root / ".cache")


def write_run(
    out: Path, benchmark: Any, items: list, root: Path, answers: Mapping[str, str], preset: str, seed: int | None = None
) -> dict[str, Any]:
    """A run folder of checkpoint ``base`` as llava.eval.run leaves it: the answer shard (``answers``: question
    id -> text, in the items' order), then the runner's result.json (returned)."""
    folder = out / "base" / (f"seed-{seed}" if seed is not None else "") / preset / benchmark.name
    folder.mkdir(parents=True)
    with AnswerWriter(shard_file(folder, 0, 1)) as writer:
        writer.write(
            {"question_id": item.question_id, "prompt": item.prompt, "text": answers[item.question_id],
             "preset": preset}
            for item in items if item.question_id in answers
        )  # fmt: skip
    info = {"model": "base", "root": str(root.resolve()), "preset": preset, "batch_size": 8, "world_size": 1}
    return score_folder(benchmark, items, folder, {**info, "seed": seed or 0})


def _run(out: Path, items: list, root: Path, right: set[int], preset: str, seed: int | None = None) -> None:
    """A playground run folder whose questions ``right`` (positions) are answered right."""
    answers = {item.question_id: "red" if i in right else "blue" for i, item in enumerate(items)}
    write_run(out, PlaygroundScenes(), items, root, answers, preset, seed)


def test_compare_results_only_reports_intervals_tests_and_seeds(tmp_path):
    root, out = tmp_path / "data", tmp_path / "eval"
    items = _playground(root)
    base = set(range(RIGHT))
    _run(out, items, root, base, "none")
    _run(out, items, root, (base - set(range(8))) | {300, 301}, "duet_64")  # b=2, c=8: p = 0.109375, n.s.
    _run(out, items, root, set(range(160)), "visionzip_64")  # 80 right answers lost, none gained
    _run(out, items, root, set(range(200)), "random_64", seed=0)  # 50 %
    _run(out, items, root, set(range(220)), "random_64", seed=1)  # 55 %
    argv = ["--model", "base=unused", "--benchmarks", "playground", "--presets", "none,duet_64,visionzip_64,random_64",
            "--root", str(root), "--out", str(out), "--results-only", "--seeds", "0,1"]  # fmt: skip
    rows = compare.main(argv)
    table = json.loads((out / "table.json").read_text())
    assert (table["alpha"], table["ci_resamples"], table["seeds"]) == (0.05, 2000, [0, 1])
    cells = {row["preset"]: row["cells"]["playground"] for row in table["rows"]}
    assert [row["preset"] for row in rows] == ["none", "duet_64", "visionzip_64", "random_64"]
    low, high = cells["none"]["ci"]
    assert cells["none"]["score"] == pytest.approx(60.0) and low == pytest.approx(55.2, abs=1.0)
    assert high == pytest.approx(64.8, abs=1.0) and "test" not in cells["none"] and "seeds" not in cells["none"]
    duet = cells["duet_64"]["test"]
    assert duet["method"] == "mcnemar_exact" and duet["p_value"] == pytest.approx(0.109375) and not duet["significant"]
    visionzip = cells["visionzip_64"]["test"]
    assert visionzip["discordant"] == [0, 80] and visionzip["p_value"] < 1e-6 and visionzip["significant"]
    random = cells["random_64"]
    assert random["score"] == pytest.approx(52.5) and random["seeds"]["values"] == {"0": 50.0, "1": 55.0}
    assert random["seeds"]["std"] == pytest.approx(math.sqrt(12.5))  # sqrt((2.5^2 + 2.5^2) / 1)
    assert random["test"]["method"] == "paired_bootstrap"  # seed-averaged scores are 0, 50 or 100
    by_preset = {row["preset"]: row for row in table["rows"]}
    assert by_preset["none"]["average_retained_ci"] == [100.0, 100.0]
    low, high = by_preset["duet_64"]["average_retained_ci"]
    assert low < by_preset["duet_64"]["average_retained"] < high
    markdown = (out / "table.md").read_text()
    assert f"| base | none | 60.0 [{cells['none']['ci'][0]:.1f}, {cells['none']['ci'][1]:.1f}] (100.0 %) |" in markdown
    assert "(97.5 %) ≈ p=0.109 |" in markdown  # duet_64: 58.5 of 60, not significant
    assert "(66.7 %) p<0.001 |" in markdown  # visionzip_64: 40 of 60, significant
    assert "| base | random_64 | 52.5 ± 3.5 [" in markdown and "seeds 0,1" in markdown
    assert "≈ = not significant at 0.05" in markdown


def test_compare_refuses_complete_rows_over_different_questions(tmp_path):
    root, out = tmp_path / "data", tmp_path / "eval"
    items = _playground(root)
    _run(out, items, root, set(range(RIGHT)), "none")
    results = compare.collect_results(out, [("base", ["none"])], ["playground"], root=str(root))
    other = {**results[0], "preset": "duet_64"}
    other["question_scores"] = {f"x{i}": 100.0 for i in range(N)}
    with pytest.raises(ValueError, match="base/duet_64 against base/none on playground: the rows do not cover"):
        compare.build_table([results[0], other], ["playground"], ("base", "none"))


def test_compare_seeds_runs_random_presets_once_per_seed_through_the_runner_seed(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(compare.run_cli, "main", lambda argv: calls.append(argv) or [])
    argv = ["--model", "m=ckpt", "--benchmarks", "playground", "--presets", "none,random_64,duet_64",
            "--out", str(tmp_path), "--seeds", "0,2", "--batch-size", "4"]  # fmt: skip
    with pytest.raises(ValueError, match="baseline"):  # nothing was generated by the stand-in runner
        compare.main(argv)
    runs = [(call[call.index("--presets") + 1], call[call.index("--out") + 1]) for call in calls]
    assert runs == [("none,duet_64", str(tmp_path / "m")), ("random_64", str(tmp_path / "m" / "seed-0")),
                    ("random_64", str(tmp_path / "m" / "seed-2"))]  # fmt: skip
    assert [call[call.index("--seed") + 1] for call in calls[1:]] == ["0", "2"] and "--seed" not in calls[0]
    assert all(call[-2:] == ["--batch-size", "4"] for call in calls)
    with pytest.raises(SystemExit):
        compare.main([*argv, "--seed", "3"])
