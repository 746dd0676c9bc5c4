"""Intervals and paired tests for headlines that are not a mean over questions: POPE (mean F1 over splits),
MME (perception sum of acc + acc+), MMBench (CircularEval), resampled on each benchmark's own units
(:class:`llava.eval.stats.UnitStatistic`) on fabricated items and answers, checked against each benchmark's
own ``score()``; then ``llava.eval.compare --results-only`` on fabricated POPE and MME result folders."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from llava.eval import compare, stats
from llava.eval.base import EvalItem
from llava.eval.benchmarks.mmbench import MMBench
from llava.eval.benchmarks.mme import MME
from llava.eval.benchmarks.pope import POPE
from tests.test_compare_stats import write_run
from tests.test_eval_choice import make_mme, make_pope

R = 400  # resamples: enough for the hand-checked cases, fast


# --- fabricated items and answers --------------------------------------------------------------------------------


def pope_items(sizes: Mapping[str, int], seed: int = 0) -> list[EvalItem]:
    """``sizes[split]`` questions per split, labels drawn at random (yes about half the time)."""
    rng = np.random.default_rng(seed)
    return [
        EvalItem(f"{split}-{i}", "", reference={"split": split, "label": "yes" if rng.random() < 0.5 else "no"})
        for split, size in sizes.items()
        for i in range(size)
    ]


def pope_answers(items: list[EvalItem], accuracy: float, seed: int = 1) -> dict[str, str]:
    """Each question answered right with probability ``accuracy`` (1: all right, 0: all wrong)."""
    rng = np.random.default_rng(seed)
    answers = {}
    for item in items:
        right = rng.random() < accuracy
        answers[item.question_id] = "Yes" if (item.reference["label"] == "yes") == right else "No"
    return answers


MME_SUBTASKS = {"existence": 9, "count": 6, "OCR": 4, "commonsense_reasoning": 5}
"""Images per subtask (two questions each, yes then no); commonsense_reasoning is cognition, not headline."""


def mme_items(images: Mapping[str, int] = MME_SUBTASKS) -> list[EvalItem]:
    return [
        EvalItem(f"{subtask}/{i}.jpg#{k}", "", reference={"subtask": subtask, "image": f"{subtask}/{i}.jpg",
                                                           "answer": ("yes", "no")[k]})
        for subtask, count in images.items()
        for i in range(count)
        for k in range(2)
    ]  # fmt: skip


def mme_answers(items: list[EvalItem], accuracy: float, seed: int = 2) -> dict[str, str]:
    """Right with probability ``accuracy``; a wrong answer is the other word or, now and then, neither."""
    rng = np.random.default_rng(seed)
    answers = {}
    for item in items:
        wrong = "no" if item.reference["answer"] == "yes" else "yes"
        answers[item.question_id] = item.reference["answer"] if rng.random() < accuracy else rng.choice([wrong, "?"])
    return answers


def mmbench_items(groups: int, copies: int = 2) -> list[EvalItem]:
    options = {"A": "red", "B": "blue"}
    return [
        EvalItem(str(group + copy * 1_000_000), "", reference={
            "answer": "AB"[copy % 2], "options": "AB", "option_text": options, "group": group, "category": "c",
            "l2_category": "l2"})
        for group in range(groups)
        for copy in range(copies)
    ]  # fmt: skip


def mmbench_answers(items: list[EvalItem], wrong_groups: set[int]) -> dict[str, str]:
    """Every row right except the first copy of the groups in ``wrong_groups``."""
    answers = {}
    for item in items:
        right = item.reference["answer"]
        flipped = int(item.question_id) < 1_000_000 and item.reference["group"] in wrong_groups
        answers[item.question_id] = ("B" if right == "A" else "A") if flipped else right
    return answers


def resampled_items(statistic: stats.UnitStatistic, items: list[EvalItem], counts: np.ndarray) -> list[EvalItem]:
    """The items of a resample: each unit's questions (ids joined by ``+``, or the question itself) as often
    as ``counts`` draws the unit, units in id order."""
    by_id = {item.question_id: item for item in items}
    ordered = statistic.in_id_order()
    return [by_id[key] for unit, times in zip(ordered.ids, counts, strict=True) for _ in range(int(times))
            for key in unit.split("+")]  # fmt: skip


# --- the full sample is the benchmark's own headline ----------------------------------------------------------


@pytest.mark.parametrize("accuracy", [0.0, 0.7, 1.0])
def test_pope_units_reproduce_the_headline_and_are_stratified_by_split(accuracy: float) -> None:
    items = pope_items({"adversarial": 30, "popular": 25, "random": 20})
    answers = pope_answers(items, accuracy)
    units = POPE().resampling_units(items, answers)
    assert units is not None and len(units) == 75 and units.values.shape == (1, 75, 9)
    assert units.value() == pytest.approx(POPE().score(items, answers).score, abs=1e-9)
    partial = {key: text for key, text in answers.items() if not key.startswith("random")}  # two splits only
    assert POPE().resampling_units(items, partial).value() == pytest.approx(POPE().score(items, partial).score)
    assert POPE().resampling_units(items, {}) is None


@pytest.mark.parametrize("protocol", ["official", "strict"])
def test_mme_units_reproduce_the_perception_sum(protocol: str) -> None:
    items = mme_items()
    answers = mme_answers(items, 0.75)
    units = MME().resampling_units(items, answers, protocol)
    score = MME().score(items, answers, protocol)
    assert units.value() == pytest.approx(score.score, abs=1e-9) and score.metrics["cognition"] > 0
    assert len(units) == 9 + 6 + 4  # perception images only: cognition is not in the headline
    assert set(units.strata) == {"existence", "count", "OCR"} and units.stratum == "subtask"
    assert units.unit == ("question pair" if protocol == "official" else "image")
    del answers["count/2.jpg#1"]  # a half-answered image counts in acc, not in acc+
    assert MME().resampling_units(items, answers, protocol).value() == pytest.approx(
        MME().score(items, answers, protocol).score, abs=1e-9
    )


def test_mmbench_units_are_question_groups_scored_0_or_100() -> None:
    items = mmbench_items(20)
    answers = mmbench_answers(items, wrong_groups={0, 1, 2, 3, 4})
    units = MMBench().resampling_units(items, answers)
    assert units.headline is None and units.unit == "question group" and len(units) == 20
    assert set(units.scores().values()) == {0.0, 100.0}
    assert units.value() == pytest.approx(MMBench().score(items, answers).score) == 75.0
    del answers["1000019"]  # an incomplete group is left out, as CircularEval leaves it out
    assert len(MMBench().resampling_units(items, answers)) == 19
    assert MMBench().resampling_units(items, answers).value() == pytest.approx(MMBench().score(items, answers).score)


# --- the bootstrap against the benchmark's own score() on the same resamples ----------------------------------


@pytest.mark.parametrize("name", ["pope", "mme"])
def test_resampled_headlines_equal_score_on_the_resampled_questions(name: str) -> None:
    """A slow explicit loop: the benchmark's ``score()`` on each resample's questions (units drawn twice
    listed twice) equals the vectorised ``h(c_r @ v)`` for the first resamples."""
    benchmark, items = (POPE(), pope_items({"adversarial": 12, "popular": 10, "random": 8})) if name == "pope" else (
        MME(), mme_items())  # fmt: skip
    answers = pope_answers(items, 0.7) if name == "pope" else mme_answers(items, 0.7)
    units = benchmark.resampling_units(items, answers)
    counts = next(stats.resample_counts(units, 50, seed=5))
    fast = stats.unit_resamples(units, 50, seed=5)
    slow = [benchmark.score(resampled_items(units, items, row), answers).score for row in counts[:8]]
    assert fast[:8] == pytest.approx(slow, abs=1e-9)
    assert len(set(np.round(fast, 6))) > 5  # the resamples do differ


def test_stratified_resampling_keeps_each_stratum_size_and_is_deterministic() -> None:
    units = MME().resampling_units(mme_items(), mme_answers(mme_items(), 0.6))
    ordered = units.in_id_order()
    strata = np.asarray(ordered.strata)
    for counts in stats.resample_counts(units, 300, seed=1):
        for subtask, size in (("existence", 9), ("count", 6), ("OCR", 4)):
            assert (counts[:, strata == subtask].sum(axis=1) == size).all()
    assert not (counts == 1).all()  # resampled, not the sample itself
    assert stats.bootstrap_ci(units, R, seed=3) == stats.bootstrap_ci(units, R, seed=3)
    assert stats.bootstrap_ci(units, R, seed=3) != stats.bootstrap_ci(units, R, seed=4)


def test_plain_mean_units_resample_like_per_question_scores() -> None:
    """MMBench's groups (no strata) draw the same indices as stats.bootstrap_means: same interval, and for
    n = 400 and p = 0.75 close to the normal one, 75 +- 1.96 sqrt(0.75 * 0.25 / 400) * 100 = 75 +- 4.24."""
    items = mmbench_items(400)
    units = MMBench().resampling_units(items, mmbench_answers(items, wrong_groups=set(range(100))))
    by_id = units.scores()
    low, high = stats.bootstrap_ci(units, 2000, seed=0)
    assert (low, high) == pytest.approx(stats.bootstrap_ci([by_id[key] for key in sorted(by_id)], 2000, seed=0))
    assert low == pytest.approx(75.0 - 4.24, abs=1.0) and high == pytest.approx(75.0 + 4.24, abs=1.0)


def test_pope_interval_is_close_to_the_delta_method_for_large_n() -> None:
    """One split, n = 3000, TP/FP/FN/TN about 0.4/0.1/0.1/0.4: F1 = 0.8 and the delta-method standard error
    of F1 = 2 TP / (2 TP + FP + FN) is sqrt(sum_j (dF1/dp_j)^2 p_j - (sum_j dF1/dp_j p_j)^2 ) / sqrt(n)."""
    rng = np.random.default_rng(7)
    n = 3000
    cells = rng.choice(4, size=n, p=[0.4, 0.1, 0.1, 0.4])  # TP, FP, FN, TN
    items = [EvalItem(str(i), "", reference={"split": "random", "label": "yes" if c in (0, 2) else "no"})
             for i, c in enumerate(cells)]  # fmt: skip
    answers = {str(i): "Yes" if c in (0, 1) else "No" for i, c in enumerate(cells)}
    units = POPE().resampling_units(items, answers)
    p = np.bincount(cells, minlength=4) / n
    denominator = 2 * p[0] + p[1] + p[2]
    f1 = 2 * p[0] / denominator
    gradient = np.array([2 / denominator - 2 * f1 / denominator, -f1 / denominator, -f1 / denominator, 0.0])
    se = 100 * np.sqrt((gradient**2 * p).sum() - (gradient * p).sum() ** 2) / np.sqrt(n)
    low, high = stats.bootstrap_ci(units, 2000, seed=0)
    assert units.value() == pytest.approx(100 * f1)
    assert low == pytest.approx(100 * f1 - 1.96 * se, abs=0.25 * se)
    assert high == pytest.approx(100 * f1 + 1.96 * se, abs=0.25 * se)


# --- hand-checkable intervals and tests ---------------------------------------------------------------------------


def test_interval_contains_the_headline_and_is_zero_width_for_identical_units() -> None:
    pope = pope_items({"adversarial": 40, "popular": 40})
    for units in (POPE().resampling_units(pope, pope_answers(pope, 0.7)),
                  MME().resampling_units(mme_items(), mme_answers(mme_items(), 0.7))):  # fmt: skip
        low, high = stats.bootstrap_ci(units, R)
        assert low < units.value() < high
    # every MME image answered the same way (first question right, second wrong): acc 50, acc+ 0 in every
    # subtask and every resample -> 3 * 50 = 150, a zero-width interval
    items = mme_items({"existence": 5, "count": 3, "OCR": 2})
    answers = {item.question_id: "yes" for item in items}
    units = MME().resampling_units(items, answers)
    assert units.value() == pytest.approx(150.0) and stats.bootstrap_ci(units, R) == pytest.approx((150.0, 150.0))


def test_paired_test_on_units_hand_checkable_cases() -> None:
    items = pope_items({"adversarial": 40, "popular": 40, "random": 40})
    perfect = POPE().resampling_units(items, pope_answers(items, 1.0))
    wrong = POPE().resampling_units(items, pope_answers(items, 0.0))
    same = stats.paired_test(perfect, perfect, R)
    assert same["method"] == "paired_bootstrap_units" and same["p_value"] == 1.0 and same["difference"] == 0.0
    assert not same["significant"] and same["n"] == 120 and same["unit"] == "question"
    # perfect (F1 100 in every resample) against all wrong (no TP: F1 0): D* = D = 100 always -> 1 / (R + 1)
    test = stats.paired_test(perfect, wrong, R)
    assert test["p_value"] == pytest.approx(1 / (R + 1)) and test["significant"]
    assert test["difference"] == pytest.approx(100.0)
    # a small change (a few answers flipped) is not significant at R = 400
    noisy = pope_answers(items, 1.0)
    for item in items[:3]:
        noisy[item.question_id] = "No" if noisy[item.question_id] == "Yes" else "Yes"
    small = stats.paired_test(POPE().resampling_units(items, noisy), perfect, R)
    assert 0.05 < small["p_value"] <= 1.0 and not small["significant"] and small["difference"] < 0
    # the p-value is the centred bootstrap one, counted by hand from the paired resamples
    row, base = stats.unit_resamples(POPE().resampling_units(items, noisy), R), stats.unit_resamples(perfect, R)
    observed = small["difference"]
    by_hand = (1 + np.count_nonzero(np.abs(row - base - observed) >= abs(observed) - 1e-9)) / (R + 1)
    assert small["p_value"] == pytest.approx(by_hand)


def test_mmbench_groups_are_compared_with_mcnemar() -> None:
    items = mmbench_items(30)
    base = MMBench().resampling_units(items, mmbench_answers(items, wrong_groups=set()))
    row = MMBench().resampling_units(items, mmbench_answers(items, wrong_groups={0, 1, 2, 3, 4, 5}))
    test = stats.paired_test(row, base)
    # 6 groups right -> wrong, none the other way: b=0, c=6, p = 2 / 2^6 = 0.03125
    assert test["method"] == "mcnemar_exact" and test["discordant"] == [0, 6] and test["unit"] == "question group"
    assert test["p_value"] == pytest.approx(0.03125) and test["difference"] == pytest.approx(-20.0)


def test_units_are_paired_by_id_and_mismatches_refused() -> None:
    items = mme_items()
    answers = mme_answers(items, 0.7)
    units = MME().resampling_units(items, answers)
    reversed_units = stats.UnitStatistic(units.ids[::-1], units.values[:, ::-1], units.headline, units.strata[::-1],
                                         units.unit, units.stratum)  # fmt: skip
    assert stats.paired_test(reversed_units, units, R)["p_value"] == 1.0  # order does not matter
    fewer = MME().resampling_units(items[2:], answers)
    with pytest.raises(ValueError, match=r"mme: the rows do not cover the same question pairs: 1 of the baseline"):
        stats.paired_test(fewer, units, R, what="mme")
    restrata = stats.UnitStatistic(units.ids, units.values, units.headline, ("x",) * len(units), units.unit)
    with pytest.raises(ValueError, match="different strata"):
        stats.paired_test(restrata, units, R)
    with pytest.raises(TypeError, match="same benchmark's units"):
        stats.paired_test(units, {"a": 1.0}, R)


def test_retained_ci_and_seeds_on_units() -> None:
    items = pope_items({"adversarial": 60, "popular": 60, "random": 60})
    base = POPE().resampling_units(items, pope_answers(items, 0.9, seed=1))
    row = POPE().resampling_units(items, pope_answers(items, 0.8, seed=2))
    assert stats.retained_ci([(base, base)], R) == (100.0, 100.0)
    mme = MME().resampling_units(mme_items(), mme_answers(mme_items(), 0.8))
    average = (100 * row.value() / base.value() + 100.0) / 2
    low, high = stats.retained_ci([(row, base), (mme, mme)], R)
    assert low < average < high
    # two seeds: the statistic is the mean of the seeds' headlines, resampled on the same units
    other = POPE().resampling_units(items, pope_answers(items, 0.8, seed=3))
    both = stats.UnitStatistic.over_seeds([row, other], "pope")
    assert both.values.shape == (2, 180, 9) and both.value() == pytest.approx((row.value() + other.value()) / 2)
    low, high = stats.bootstrap_ci(both, R)
    assert low < both.value() < high


# --- compare end to end -----------------------------------------------------------------------------------------

POPE_LABELS = {split: ["yes", "no"] * 15 for split in ("adversarial", "popular", "random")}


def test_compare_gives_pope_and_mme_cells_intervals_and_tests(tmp_path: Path) -> None:
    root, out = tmp_path / "data", tmp_path / "eval"
    make_pope(root, POPE_LABELS)
    make_mme(root)
    pope_questions = POPE().load(root, root / ".cache")
    mme_questions = MME().load(root, root / ".cache")
    pope_right = {item.question_id: item.reference["label"].capitalize() for item in pope_questions}
    pope_flipped = {key: "No" if text == "Yes" else "Yes" for key, text in pope_right.items()}
    pope_some = {**pope_right, **{key: pope_flipped[key] for key in list(pope_right)[:4]}}
    mme_right = {item.question_id: item.reference["answer"] for item in mme_questions}
    mme_one_wrong = {**mme_right, "existence/b.jpg#1": "yes"}  # existence: acc 75, acc+ 50 -> 125
    runs = {
        "none": (pope_right, mme_right),
        "duet_64": (pope_some, mme_one_wrong),
        "visionzip_64": (pope_flipped, mme_right),
    }
    for preset, (pope, mme) in runs.items():
        write_run(out, POPE(), pope_questions, root, pope, preset)
        write_run(out, MME(), mme_questions, root, mme, preset)
    argv = ["--model", "base=unused", "--benchmarks", "pope,mme", "--presets", ",".join(runs), "--root", str(root),
            "--out", str(out), "--results-only", "--ci-resamples", str(R)]  # fmt: skip
    compare.main(argv)
    table = json.loads((out / "table.json").read_text())
    assert table["no_interval"] == {}
    cells = {row["preset"]: row["cells"] for row in table["rows"]}
    none = cells["none"]
    assert none["pope"]["score"] == 100.0 and none["pope"]["ci"] == [100.0, 100.0] and "test" not in none["pope"]
    assert (none["pope"]["n"], none["pope"]["unit"], none["mme"]["n"], none["mme"]["unit"]) == (
        90, "question", 2, "question pair")  # fmt: skip
    assert none["mme"]["score"] == 200.0 and none["mme"]["ci"] == [200.0, 200.0]
    # duet_64 on MME: units a (200) and b (125) drawn within existence -> H* = 200, 125 or 50 with
    # probabilities 1/4, 1/2, 1/4: interval [50, 200]; |D* - D| = 75 >= |D| = 75 half the time -> p ~ 0.5
    duet = cells["duet_64"]
    assert duet["mme"]["score"] == pytest.approx(125.0) and duet["mme"]["ci"] == [50.0, 200.0]
    assert duet["mme"]["test"]["method"] == "paired_bootstrap_units" and not duet["mme"]["test"]["significant"]
    assert 0.4 < duet["mme"]["test"]["p_value"] < 0.6
    assert duet["pope"]["ci"][0] < duet["pope"]["score"] < duet["pope"]["ci"][1] <= 100.0
    assert duet["pope"]["test"]["method"] == "paired_bootstrap_units"
    visionzip = cells["visionzip_64"]["pope"]
    assert visionzip["score"] == 0.0 and visionzip["test"]["p_value"] == pytest.approx(1 / (R + 1))
    assert visionzip["test"]["significant"] and cells["visionzip_64"]["mme"]["test"]["p_value"] == 1.0
    by_preset = {row["preset"]: row for row in table["rows"]}
    assert by_preset["none"]["average_retained_ci"] == [100.0, 100.0]
    low, high = by_preset["duet_64"]["average_retained_ci"]
    assert low < by_preset["duet_64"]["average_retained"] < high
    markdown = (out / "table.md").read_text()
    assert "resampled on the benchmark's own units" in markdown and "pope: questions resampled within" in markdown
    assert "| base | visionzip_64 | 0.0 [0.0, 0.0] (0.0 %) p=0.002 |" in markdown  # 1 / 401


def test_compare_refuses_units_that_do_not_reproduce_the_recorded_score(tmp_path: Path) -> None:
    root, out = tmp_path / "data", tmp_path / "eval"
    make_pope(root, POPE_LABELS)
    items = POPE().load(root, root / ".cache")
    write_run(out, POPE(), items, root, {item.question_id: "Yes" for item in items}, "none")
    result_file = out / "base" / "none" / "pope" / "result.json"
    result = json.loads(result_file.read_text())
    units, note = compare.question_scores(result, result_file.parent)
    assert isinstance(units, stats.UnitStatistic) and note is None and units.value() == pytest.approx(result["score"])
    units, note = compare.question_scores({**result, "score": result["score"] + 1.0}, result_file.parent)
    assert units is None and note.startswith("headline not reproduced from its questions")


def test_build_table_averages_unit_headlines_over_seeds() -> None:
    """Seeded cells of a unit benchmark: score = mean of the seeds' headlines, interval and test on the
    seeds' statistics stacked (every seed resampled with the same questions)."""
    items = pope_items({"adversarial": 50, "popular": 50})
    seeds = {0: pope_answers(items, 0.8, seed=10), 1: pope_answers(items, 0.6, seed=11)}
    base_answers = pope_answers(items, 0.9, seed=12)

    def result(preset: str, answers: Mapping[str, str], seed: int | None = None) -> dict:
        units = POPE().resampling_units(items, answers)
        return {"checkpoint": "base", "preset": preset, "benchmark": "pope", "score": units.value(),
                "complete": True, "num_scored": 100, "num_questions": 100, "prefill_s": 1.0, "protocol": "official",
                "question_scores": units, **({} if seed is None else {"repeat_seed": seed})}  # fmt: skip

    results = [result("none", base_answers), *(result("random_64", answers, seed) for seed, answers in seeds.items())]
    rows = compare.build_table(results, ["pope"], ("base", "none"), n_resamples=R)
    cell = rows[1]["cells"]["pope"]
    headlines = [POPE().score(items, answers).score for answers in seeds.values()]
    assert cell["score"] == pytest.approx(sum(headlines) / 2) and cell["seeds"]["std"] is not None
    assert cell["ci"][0] < cell["score"] < cell["ci"][1] and cell["unit"] == "question" and cell["n"] == 100
    assert cell["test"]["method"] == "paired_bootstrap_units" and cell["test"]["difference"] < 0
    assert cell["test"]["difference"] == pytest.approx(cell["score"] - results[0]["score"])
