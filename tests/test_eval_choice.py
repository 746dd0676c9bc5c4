"""Multiple-choice and yes/no benchmarks (MME, POPE, ScienceQA, MMBench, SEED): files fabricated in
their exact formats, loaded, and scored against hand-computed numbers."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from llava.eval.base import OPTION_LETTER, SHORT_ANSWER, EvalDataError
from llava.eval.benchmarks.choice import parse_option_letter, parse_yes_no_mme, parse_yes_no_pope
from llava.eval.benchmarks.mmbench import MMBench
from llava.eval.benchmarks.mme import MME, parse_calculation
from llava.eval.benchmarks.pope import POPE, split_metrics
from llava.eval.benchmarks.seed import SEEDBench
from llava.eval.benchmarks.sqa import ScienceQA

YN = " Please answer yes or no."


def write_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 10, 10)).save(path)


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


# --- answer parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        (" B\n", "B"),
        ("B. a cat", "B"),
        ("The answer is C.", "C"),
        ("Because of the light, The answer is A.", "A"),
        ("b", None),
        ("Z", None),
        ("I think B", None),
        ("", None),
    ],
)
def test_option_letter_parsing(text: str, expected: str | None) -> None:
    assert parse_option_letter(text, "ABCD") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("Yes", "yes"), ("no.", "no"), ("Yes, there is a dog.", "yes"), ("Not really", "no"), ("Maybe", "other")],
)
def test_mme_yes_no(text: str, expected: str) -> None:
    assert parse_yes_no_mme(text) == expected


# --- MME ------------------------------------------------------------------------------------------


def make_mme(root: Path) -> None:
    """MME in the real layout: LLaVA's questions end with the short-answer suffix; the ground-truth lines
    with MME's " Please answer yes or no." (one with two spaces, as some real files have)."""
    release = root / "MME" / "MME_Benchmark_release_version"
    questions = []
    # "existence" uses the flat layout, "commonsense_reasoning" the images/ + questions_answers_YN/ one.
    for subtask, nested in (("existence", False), ("commonsense_reasoning", True)):
        for stem in ("a", "b"):
            folder = release / subtask
            image = folder / "images" / f"{stem}.jpg" if nested else folder / f"{stem}.jpg"
            truth = folder / "questions_answers_YN" / f"{stem}.txt" if nested else folder / f"{stem}.txt"
            write_image(image)
            truth.parent.mkdir(parents=True, exist_ok=True)
            asked = [f"Is there a {stem} dog?", f"Is there a {stem} cat?"]
            spacing = " " if (subtask, stem) != ("existence", "b") else "  "
            truth.write_text(f"{asked[0]}{YN}\tYes\n{asked[1]}{spacing}{YN.strip()}\tNo\n")
            for question in asked:
                name = f"{subtask}/{stem}.jpg"
                text = question + SHORT_ANSWER
                questions.append({"question_id": name, "image": name, "text": text, "category": subtask})
    write_jsonl(root / "MME" / "llava_mme.jsonl", questions)


def test_mme_load_and_score(tmp_path: Path) -> None:
    make_mme(tmp_path)
    items = MME().load(tmp_path, tmp_path / "cache")
    ids = [item.question_id for item in items]
    assert ids[:2] == ["existence/a.jpg#0", "existence/a.jpg#1"]
    assert len(set(ids)) == 8
    assert [item.reference["answer"] for item in items] == ["yes", "no"] * 4
    # the double-space ground-truth line is found and kept verbatim for the export
    assert items[3].reference["mme_question"] == "Is there a b cat?  Please answer yes or no."
    assert items[4].image.endswith("commonsense_reasoning/images/a.jpg")
    assert items[0].prompt == "Is there a a dog?" + SHORT_ANSWER and items[0].max_new_tokens == 128

    predictions = {
        # existence: a both right; b one wrong -> acc 75, acc+ 50, score 125
        "existence/a.jpg#0": "Yes.",
        "existence/a.jpg#1": "No",
        "existence/b.jpg#0": "Yes",
        "existence/b.jpg#1": "Yes",
        # commonsense: a both right, b both right ("no," read within the first four chars) -> 200
        "commonsense_reasoning/a.jpg#0": "yes",
        "commonsense_reasoning/a.jpg#1": "no",
        "commonsense_reasoning/b.jpg#0": "Yes, it is",
        "commonsense_reasoning/b.jpg#1": "no, it is not",
    }
    for protocol in ("official", "strict"):  # these answers read the same under both
        score = MME().score(items, predictions, protocol=protocol)
        assert score.metrics["protocol"] == protocol
        assert score.metrics["existence/acc"] == pytest.approx(75.0)
        assert score.metrics["existence/acc+"] == pytest.approx(50.0)
        assert score.metrics["existence/score"] == pytest.approx(125.0)
        assert score.metrics["commonsense_reasoning/score"] == pytest.approx(200.0)
        assert score.metrics["perception"] == pytest.approx(125.0)
        assert score.metrics["cognition"] == pytest.approx(200.0)
        assert score.metrics["total"] == pytest.approx(325.0)
        assert score.score == pytest.approx(125.0)
        assert score.complete
    assert MME().score(items, predictions).metrics["protocol"] == "official"

    # An unanswered question leaves its image out of acc+ and the item unscored.
    del predictions["existence/b.jpg#1"]
    for protocol in ("official", "strict"):
        partial = MME().score(items, predictions, protocol=protocol)
        assert partial.num_scored == 7 and not partial.complete
        assert partial.metrics["existence/acc"] == pytest.approx(100.0)
        assert partial.metrics["existence/acc+"] == pytest.approx(100.0)


@pytest.mark.parametrize(
    ("text", "official", "strict"),
    [
        ("Yes", "yes", "yes"),
        ("No.", "no", "no"),
        ("yes, there is", "yes", "yes"),
        ("Not really", "no", "no"),
        ("Maybe", "other", "other"),
        # MME's calculation.py neither strips nor drops periods; lmms-eval (strict) does both
        ("...No", "other", "no"),
        ("  Yes", "other", "yes"),
        ("Y.e.s.", "other", "yes"),
        ("\nno", "no", "no"),
    ],
)
def test_mme_answer_reading_per_protocol(text: str, official: str, strict: str) -> None:
    assert parse_calculation(text) == official
    assert parse_yes_no_mme(text) == strict


def test_mme_protocols_differ_by_hand(tmp_path: Path) -> None:
    make_mme(tmp_path)
    items = MME().load(tmp_path, tmp_path / "cache")
    answers = ["Yes", "...No", "  Yes", "No", "Yes", "No", "Yes", "No"]
    predictions = {item.question_id: text for item, text in zip(items, answers, strict=True)}
    # official: existence a: right, other -> 1/2; b: other, right -> 1/2; acc 2/4 = 50, acc+ 0 -> 50
    official = MME().score(items, predictions, protocol="official")
    assert official.metrics["existence/acc"] == pytest.approx(50.0)
    assert official.metrics["existence/acc+"] == pytest.approx(0.0)
    assert official.score == pytest.approx(50.0)
    # strict reads "...No" as no and "  Yes" as yes: all four right -> 200
    strict = MME().score(items, predictions, protocol="strict")
    assert strict.score == pytest.approx(200.0)
    assert official.metrics["cognition"] == strict.metrics["cognition"] == pytest.approx(200.0)
    with pytest.raises(ValueError, match="unknown scoring protocol 'lenient'"):
        MME().score(items, predictions, protocol="lenient")


def test_mme_official_acc_plus_pairs_consecutive_lines(tmp_path: Path) -> None:
    # calculation.py pairs the lines of a subtask two by two in order; with a question file that
    # interleaves two images, its pairs are (a#0, b#0) and (a#1, b#1), not one image each.
    make_mme(tmp_path)
    question_file = tmp_path / "MME" / "llava_mme.jsonl"
    lines = question_file.read_text().splitlines()
    question_file.write_text("\n".join([lines[0], lines[2], lines[1], lines[3], *lines[4:]]) + "\n")
    items = MME().load(tmp_path, tmp_path / "cache")
    assert [item.question_id for item in items[:4]] == [
        "existence/a.jpg#0",
        "existence/b.jpg#0",
        "existence/a.jpg#1",
        "existence/b.jpg#1",
    ]
    # a#0 right, b#0 right, a#1 wrong, b#1 right
    answers = ["Yes", "Yes", "Yes", "No", "Yes", "No", "Yes", "No"]
    predictions = {item.question_id: text for item, text in zip(items, answers, strict=True)}
    official = MME().score(items, predictions, protocol="official")
    strict = MME().score(items, predictions, protocol="strict")
    # official pairs: (a#0, b#0) both right, (a#1, b#1) not -> acc+ 1/2; strict: image b only -> also 1/2
    assert official.metrics["existence/acc"] == strict.metrics["existence/acc"] == pytest.approx(75.0)
    assert official.metrics["existence/acc+"] == pytest.approx(50.0)
    assert strict.metrics["existence/acc+"] == pytest.approx(50.0)
    # a#1 right, b#1 wrong: official (a#0, b#0) right -> 1/2; strict: image a right, b wrong -> 1/2
    predictions["existence/a.jpg#1"], predictions["existence/b.jpg#1"] = "No", "Yes"
    assert MME().score(items, predictions, protocol="official").metrics["existence/acc+"] == pytest.approx(50.0)
    assert MME().score(items, predictions, protocol="strict").metrics["existence/acc+"] == pytest.approx(50.0)
    predictions["existence/a.jpg#1"] = "Yes"  # a#1 and b#1 wrong: official 1/2 (first pair), strict 0/2
    assert MME().score(items, predictions, protocol="official").metrics["existence/acc+"] == pytest.approx(50.0)
    assert MME().score(items, predictions, protocol="strict").metrics["existence/acc+"] == pytest.approx(0.0)


def test_mme_question_without_ground_truth_line(tmp_path: Path) -> None:
    make_mme(tmp_path)
    truth = tmp_path / "MME" / "MME_Benchmark_release_version" / "existence" / "b.txt"
    truth.write_text(f"Is there a b dog?{YN}\tYes\nIs there a b horse?{YN}\tNo\n")
    with pytest.raises(EvalDataError, match=r"llava_mme\.jsonl:4: question existence/b\.jpg: no line of .*b\.txt"):
        MME().load(tmp_path, tmp_path / "cache")


def test_mme_missing_image_names_file_and_question(tmp_path: Path) -> None:
    make_mme(tmp_path)
    (tmp_path / "MME" / "MME_Benchmark_release_version" / "existence" / "b.jpg").unlink()
    with pytest.raises(EvalDataError, match=r"llava_mme\.jsonl: question existence/b\.jpg: image .* not found"):
        MME().load(tmp_path, tmp_path / "cache")


# --- POPE -----------------------------------------------------------------------------------------

POPE_OFFSETS = {"adversarial": 0, "random": 10_000_000, "popular": 20_000_000}
"""LLaVA's llava_pope_test.jsonl numbers the splits from these offsets (+1); POPE's label files from 1."""


def pope_question(position: int, split: str, label: str) -> tuple[str, str]:
    """(image, bare question) of a split's question: two per image, the same images in every split (as in
    POPE), present objects asked in every split, absent ones differing per split."""
    image = f"COCO_val2014_{310196 + position // 2:012d}.jpg"
    thing = f"thing{position}" if label == "yes" else f"{split}-thing{position}"
    return image, f"Is there a {thing} in the image?"


def make_pope(root: Path, labels: dict[str, list[str]]) -> dict[str, list[int]]:
    """POPE in the real layout: llava_pope_test.jsonl with LLaVA's ids (split offsets) and short-answer
    suffix, label files ``coco_pope_<split>.json`` numbered from 1 with the bare question. Returns LLaVA's
    ids per split."""
    questions, ids = [], {}
    for split in ("adversarial", "random", "popular"):
        if split not in labels:
            continue
        label_records = []
        for position, label in enumerate(labels[split]):
            image, text = pope_question(position, split, label)
            write_image(root / "pope" / "val2014" / image)
            question_id = POPE_OFFSETS[split] + position + 1
            questions.append(
                {"question_id": question_id, "image": image, "text": text + SHORT_ANSWER, "category": split}
            )
            label_records.append({"question_id": position + 1, "image": image, "text": text, "label": label})
            ids.setdefault(split, []).append(question_id)
        write_jsonl(root / "pope" / "coco" / f"coco_pope_{split}.json", label_records)
    write_jsonl(root / "pope" / "llava_pope_test.jsonl", questions)
    return ids


def test_split_metrics_by_hand() -> None:
    # TP=2, FP=1, FN=1, TN=1: precision 2/3, recall 2/3, F1 2/3, accuracy 3/5, yes ratio 3/5
    measures = split_metrics(["yes", "yes", "yes", "no", "no"], ["yes", "yes", "no", "yes", "no"])
    assert measures["precision"] == pytest.approx(2 / 3)
    assert measures["recall"] == pytest.approx(2 / 3)
    assert measures["f1"] == pytest.approx(2 / 3)
    assert measures["accuracy"] == pytest.approx(0.6)
    assert measures["yes_ratio"] == pytest.approx(0.6)


def test_pope_pairs_real_ids_and_averages_splits(tmp_path: Path) -> None:
    ids = make_pope(tmp_path, {"adversarial": ["yes", "no", "yes", "no"], "random": ["yes", "yes", "no", "no"]})
    assert ids == {"adversarial": [1, 2, 3, 4], "random": [10000001, 10000002, 10000003, 10000004]}
    items = POPE().load(tmp_path, tmp_path / "cache")
    assert [item.question_id for item in items] == [str(i) for i in ids["adversarial"] + ids["random"]]
    assert [item.reference["label"] for item in items] == ["yes", "no", "yes", "no", "yes", "yes", "no", "no"]
    assert items[0].prompt.endswith(SHORT_ANSWER)
    adversarial, random = ids["adversarial"], ids["random"]
    predictions = {
        # adversarial all right: F1 1, yes ratio 0.5
        str(adversarial[0]): "Yes, there is.",
        str(adversarial[1]): "No, there is not.",
        str(adversarial[2]): "Yes",
        str(adversarial[3]): "There is not.",
        # random: TP=1, FN=1, FP=1, TN=1 -> precision 0.5, recall 0.5, F1 0.5, yes ratio 0.5
        str(random[0]): "Yes",
        str(random[1]): "No",
        str(random[2]): "Yes",
        str(random[3]): "no",
    }
    score = POPE().score(items, predictions)
    assert score.metrics["protocol"] == "official"
    assert score.metrics["adversarial/f1"] == pytest.approx(1.0)
    assert score.metrics["random/precision"] == pytest.approx(0.5)
    assert score.metrics["random/recall"] == pytest.approx(0.5)
    assert score.metrics["random/yes_ratio"] == pytest.approx(0.5)
    assert score.metrics["f1"] == pytest.approx(0.75)
    assert score.metrics["accuracy"] == pytest.approx(0.75)
    assert score.score == pytest.approx(75.0)
    assert "popular/f1" not in score.metrics

    partial = POPE().score(items, {key: value for key, value in predictions.items() if key != str(random[3])})
    assert partial.num_scored == 7 and partial.num_questions == 8


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes, there is a dog.", "yes"),
        ("No, there is none.", "no"),
        ("There is not a dog in the image.", "no"),
        ("There is a dog. It is not brown.", "yes"),
        ("Nope", "yes"),
        ("No.", "no"),
        ("No\nthere is none", "yes"),  # eval_pope.py splits on single spaces only
        ("", "yes"),
    ],
)
def test_pope_yes_no_as_eval_pope_reads_it(text: str, expected: str) -> None:
    assert parse_yes_no_pope(text) == expected


def test_pope_unknown_protocol(tmp_path: Path) -> None:
    make_pope(tmp_path, {"random": ["yes", "no"]})
    items = POPE().load(tmp_path, tmp_path / "cache")
    assert POPE().score(items, {"10000001": "Yes"}, protocol="strict").metrics["protocol"] == "strict"
    with pytest.raises(ValueError, match="unknown scoring protocol"):
        POPE().score(items, {}, protocol="OFFICIAL")


def test_pope_label_file_in_another_order(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Pairing is by image and question, so a reordered label file gives the same labels; the log says that
    # LLaVA's eval_pope.py, which pairs by order, would misalign it.
    make_pope(tmp_path, {"adversarial": ["yes", "no"], "random": ["no", "yes", "yes", "no"]})
    label_file = tmp_path / "pope" / "coco" / "coco_pope_random.json"
    records = [json.loads(line) for line in label_file.read_text().splitlines()]
    write_jsonl(label_file, records[::-1])
    with caplog.at_level("WARNING", logger="llava.eval.benchmarks.pope"):
        items = POPE().load(tmp_path, tmp_path / "cache")
    assert [item.reference["label"] for item in items] == ["yes", "no", "no", "yes", "yes", "no"]
    assert "coco_pope_random.json" in caplog.text and "misalign" in caplog.text


def test_pope_label_file_not_matching_questions(tmp_path: Path) -> None:
    make_pope(tmp_path, {"random": ["yes", "no"]})
    label_file = tmp_path / "pope" / "coco" / "coco_pope_random.json"
    write_jsonl(label_file, [{"question_id": 1, "image": "COCO_val2014_other.jpg", "text": "?", "label": "yes"}])
    with pytest.raises(
        EvalDataError, match=r"coco_pope_random\.json does not belong to .*llava_pope_test\.jsonl: .*question 10000001"
    ):
        POPE().load(tmp_path, tmp_path / "cache")


def test_pope_malformed_jsonl_line(tmp_path: Path) -> None:
    make_pope(tmp_path, {"random": ["yes", "no"]})
    question_file = tmp_path / "pope" / "llava_pope_test.jsonl"
    question_file.write_text(question_file.read_text() + "{not json\n")
    with pytest.raises(EvalDataError, match=r"llava_pope_test\.jsonl:3: not valid JSON"):
        POPE().load(tmp_path, tmp_path / "cache")


def test_pope_path_escaping_root(tmp_path: Path) -> None:
    make_pope(tmp_path, {"random": ["yes"]})
    write_image(tmp_path / "pope" / "x.png")
    record = {"question_id": 7, "image": "../x.png", "text": "Is there a dog?", "category": "random"}
    write_jsonl(tmp_path / "pope" / "llava_pope_test.jsonl", [record])
    with pytest.raises(EvalDataError, match=r"question 7: '\.\./x\.png' points outside"):
        POPE().load(tmp_path, tmp_path / "cache")


# --- ScienceQA ------------------------------------------------------------------------------------


def make_sqa(root: Path) -> None:
    folder = root / "scienceqa"
    records = []
    for number, answer in enumerate("ABA", start=1):
        human = f"<image>\nContext: a picture.\nWhich is it {number}?\nA. red\nB. blue"
        records.append(
            {
                "id": str(number),
                "image": "image.png",
                "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}],
            }
        )
        write_image(folder / "images" / "test" / str(number) / "image.png")
    text_only = {
        "id": "9",
        "conversations": [
            {"from": "human", "value": "Context: none.\nWhich?\nA. x\nB. y\nC. z"},
            {"from": "gpt", "value": "C"},
        ],
    }
    records.append(text_only)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "llava_test_CQM-A.json").write_text(json.dumps(records))


def test_sqa_image_questions(tmp_path: Path) -> None:
    make_sqa(tmp_path)
    items = ScienceQA().load(tmp_path, tmp_path / "cache")
    assert [item.question_id for item in items] == ["1", "2", "3"]
    assert items[0].prompt == "Context: a picture.\nWhich is it 1?\nA. red\nB. blue" + OPTION_LETTER
    assert items[0].image.endswith("images/test/1/image.png")
    assert items[0].max_new_tokens == 1024
    score = ScienceQA().score(items, {"1": "A. red", "2": "The answer is A.", "3": "It is A"})
    assert score.score == pytest.approx(100 / 3)
    assert score.num_scored == 3

    everything = ScienceQA(image_only=False).load(tmp_path, tmp_path / "cache")
    assert len(everything) == 4 and everything[3].image is None
    score = ScienceQA(image_only=False).score(everything, {"1": "A", "2": "B", "9": "C"})
    assert score.score == pytest.approx(100.0)
    assert score.metrics["all_accuracy"] == pytest.approx(100.0)
    assert score.num_scored == 3 and score.num_questions == 4


def test_sqa_missing_image(tmp_path: Path) -> None:
    make_sqa(tmp_path)
    (tmp_path / "scienceqa" / "images" / "test" / "2" / "image.png").unlink()
    with pytest.raises(EvalDataError, match=r"llava_test_CQM-A\.json: question 2: image .* not found"):
        ScienceQA().load(tmp_path, tmp_path / "cache")


# --- MMBench --------------------------------------------------------------------------------------


def png_base64(color: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def make_mmbench(root: Path) -> None:
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "source", "split"]
    header.append("image")
    image = png_base64((0, 0, 255))
    rows = [
        # question 0 and its shifted copy; question 1 (two options, no hint) and its copy
        ["0", "What color?", "A sky.", "blue", "red", "green", "", "A", "color", "attr", "s", "dev", image],
        ["1000000", "What color?", "A sky.", "red", "green", "blue", "", "C", "color", "attr", "s", "dev", "0"],
        ["1", "Is it round?", "nan", "yes", "no", "", "", "B", "shape", "attr", "s", "dev", image],
        ["1000001", "Is it round?", "nan", "no", "yes", "", "", "A", "shape", "attr", "s", "dev", image],
    ]
    folder = root / "mmbench"
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(header)] + ["\t".join(row) for row in rows]
    (folder / "mmbench_dev_20230712.tsv").write_text("\n".join(lines) + "\n")


def test_mmbench_prompts_images_and_circular_eval(tmp_path: Path) -> None:
    make_mmbench(tmp_path)
    cache = tmp_path / "cache"
    items = MMBench().load(tmp_path, cache)
    assert [item.question_id for item in items] == ["0", "1000000", "1", "1000001"]
    assert items[0].prompt == "A sky.\nWhat color?\nA. blue\nB. red\nC. green" + OPTION_LETTER
    assert items[2].prompt == "Is it round?\nA. yes\nB. no" + OPTION_LETTER
    assert items[1].image == items[0].image
    with Image.open(items[0].image) as decoded:
        assert decoded.size == (4, 4)
    assert {path.name for path in (cache / "mmbench").iterdir()} == {"0.png", "1.png", "1000001.png"}

    # question 0 right in both copies; question 1 wrong in its shifted copy -> circular 50, plain 75
    predictions = {"0": "A", "1000000": "C. blue", "1": "B", "1000001": "B"}
    score = MMBench().score(items, predictions)
    assert score.score == pytest.approx(50.0)
    assert score.metrics["plain_accuracy"] == pytest.approx(75.0)
    assert score.metrics["category/color"] == pytest.approx(100.0)
    assert score.metrics["category/shape"] == pytest.approx(0.0)
    assert score.metrics["l2_category/attr"] == pytest.approx(50.0)

    partial = MMBench().score(items, {"0": "A", "1000000": "C", "1": "B"})
    assert partial.num_scored == 3
    assert partial.metrics["questions_scored"] == 1 and partial.score == pytest.approx(100.0)

    assert MMBench().load(tmp_path, cache)[0].image == items[0].image  # decoded once, reused


# --- SEED-Bench -----------------------------------------------------------------------------------


def make_seed(root: Path) -> None:
    folder = root / "seed_bench"
    questions, truth = [], []
    for number, (data_type, type_id, answer) in enumerate([("image", 1, "A"), ("image", 2, "B"), ("video", 10, "C")]):
        image = f"SEED-Bench-image/{number}.jpg" if data_type == "image" else f"SEED-Bench-video-image/{number}.png"
        write_image(folder / image)
        text = f"Question {number}?\nA. a\nB. b\nC. c\nD. d" + OPTION_LETTER
        questions.append({"question_id": str(100 + number), "image": image, "text": text, "category": "x"})
        truth.append(
            {"question_id": str(100 + number), "data_type": data_type, "answer": answer, "question_type_id": type_id}
        )
    write_jsonl(folder / "llava-seed-bench.jsonl", questions)
    types = {"Scene Understanding": 1, "Instance Identity": 2, "Action Recognition": 10}
    (folder / "SEED-Bench.json").write_text(json.dumps({"questions": truth, "question_type": types}))


def test_seed_accuracy_per_type(tmp_path: Path) -> None:
    make_seed(tmp_path)
    items = SEEDBench().load(tmp_path, tmp_path / "cache")
    assert [item.reference["answer"] for item in items] == ["A", "B", "C"]
    score = SEEDBench().score(items, {"100": "A", "101": "C", "102": "The answer is C."}, protocol="strict")
    assert score.score == pytest.approx(50.0)
    assert score.metrics["video"] == pytest.approx(100.0)
    assert score.metrics["all"] == pytest.approx(200 / 3)
    assert score.metrics["type/Scene Understanding"] == pytest.approx(100.0)
    assert score.metrics["type/Instance Identity"] == pytest.approx(0.0)


def test_seed_question_without_answer(tmp_path: Path) -> None:
    make_seed(tmp_path)
    truth_file = tmp_path / "seed_bench" / "SEED-Bench.json"
    data = json.loads(truth_file.read_text())
    data["questions"] = data["questions"][:2]
    truth_file.write_text(json.dumps(data))
    with pytest.raises(EvalDataError, match=r"SEED-Bench\.json: no answer for question 102"):
        SEEDBench().load(tmp_path, tmp_path / "cache")


def test_registry_names_match() -> None:
    from llava.eval.registry import get_benchmark

    for name in ("mme", "pope", "sqa", "mmbench", "seed"):
        assert get_benchmark(name).name == name
