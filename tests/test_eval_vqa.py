"""Short-answer VQA benchmarks (TextVQA, GQA, VQAv2, VizWiz): the EvalAI normalisation, the VQA accuracy,
loading fabricated files in the real layouts, scoring, submissions and the load-time errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from llava.eval.base import SHORT_ANSWER, EvalDataError
from llava.eval.benchmarks.gqa import GQA
from llava.eval.benchmarks.textvqa import TextVQA
from llava.eval.benchmarks.vizwiz import UNANSWERABLE_HINT, VizWiz
from llava.eval.benchmarks.vqa_metric import normalize_answer, vqa_accuracy
from llava.eval.benchmarks.vqav2 import VQAv2


def make_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 10, 10)).save(path, format="PNG")


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


# --- normalisation and accuracy -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),
        ("none", "0"),
        ("ten dogs", "10 dogs"),
        ("The Dog", "dog"),
        ("a cat and an apple", "cat and apple"),
        ("Yes.", "yes"),
        ("1.5", "1.5"),
        ("the end.", "end"),
        ("dont", "don't"),
        ("isnt it", "isn't it"),
        ("1,000", "1000"),
        ("red, white", "red white"),
        ("what?", "what"),
        ("left-hand", "left hand"),
        ("x - y", "x y"),
        ("  Hello\tWorld \n", "hello world"),
        ("man's hat", "man 's hat"),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_vqa_accuracy_hand_computed() -> None:
    # 3+ matching annotators: every leave-one-out subset still holds >= 3 matches (or exactly 3 -> 1 or 2/3).
    assert vqa_accuracy("cat", ["cat"] * 10) == 1.0
    # 1 of 10: the 9 subsets that keep it give 1/3, the one that drops it 0 -> 9 * (1/3) / 10 = 0.3.
    assert vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)
    # 2 of 10: 8 subsets hold 2 -> 2/3, 2 subsets hold 1 -> 1/3: (8*2/3 + 2/3) / 10 = 0.6.
    assert vqa_accuracy("cat", ["cat"] * 2 + ["dog"] * 8) == pytest.approx(0.6)
    # 3 of 10: 7 subsets hold 3 -> 1, 3 subsets hold 2 -> 2/3: (7 + 2) / 10 = 0.9.
    assert vqa_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("cat", ["cat"] * 4 + ["dog"] * 6) == 1.0
    assert vqa_accuracy("bird", ["cat"] * 10) == 0.0


def test_vqa_accuracy_normalises_both_sides() -> None:
    answers = ["two", "2", "Two.", "the two"] + ["three"] * 6
    assert vqa_accuracy("2", answers) == 1.0
    assert vqa_accuracy("Three", answers) == 1.0
    assert vqa_accuracy("don't", ["dont"] * 10) == 1.0
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("x", [])


# --- TextVQA --------------------------------------------------------------------------------------


def textvqa_root(tmp_path: Path) -> Path:
    folder = tmp_path / "textvqa"
    make_image(folder / "train_images" / "img1.jpg")
    make_image(folder / "train_images" / "img2.jpg")
    write_jsonl(
        folder / "llava_textvqa_val_v051_ocr.jsonl",
        [
            {
                "question_id": "img1",
                "image": "img1.jpg",
                "text": f"What brand?\nReference OCR token: Nikon, D3{SHORT_ANSWER}",
            },
            {
                "question_id": "img1",
                "image": "img1.jpg",
                "text": f"What Year?\nReference OCR token: 1999{SHORT_ANSWER}",
            },
            {"question_id": "img2", "image": "img2.jpg", "text": f"what number?{SHORT_ANSWER}"},
        ],
    )
    write_json(
        folder / "TextVQA_0.5.1_val.json",
        {
            "data": [
                {"question": "what brand?", "image_id": "img1", "answers": ["nikon"] * 10},
                {"question": "what year?", "image_id": "img1", "answers": ["1999"] * 2 + ["2000"] * 8},
                {"question": "What number?", "image_id": "img2", "answers": ["seven"] * 10},
            ]
        },
    )
    return tmp_path


def test_textvqa_load_and_score(tmp_path: Path) -> None:
    root = textvqa_root(tmp_path)
    benchmark = TextVQA(with_ocr=True)
    assert (benchmark.name, benchmark.score_name) == ("textvqa", "VQA accuracy")
    items = benchmark.load(root, tmp_path / "cache")
    assert [item.question_id for item in items] == ["img1#1", "img1#2", "img2#1"]
    assert items[0].prompt == f"What brand?\nReference OCR token: Nikon, D3{SHORT_ANSWER}"
    assert items[0].image == str((root / "textvqa" / "train_images" / "img1.jpg").resolve())
    assert items[0].max_new_tokens == 128
    assert items[1].reference["answers"] == ["1999"] * 2 + ["2000"] * 8

    score = benchmark.score(items, {"img1#1": "Nikon.", "img1#2": "1999", "img2#1": "7"})
    assert score.num_scored == 3 and score.num_questions == 3
    assert score.score == pytest.approx(100 * (1 + 0.6 + 1) / 3)

    partial = benchmark.score(items, {"img1#1": "Canon"})
    assert (partial.num_scored, partial.complete, partial.score) == (1, False, 0.0)


def test_textvqa_without_ocr_drops_the_ocr_line(tmp_path: Path) -> None:
    root = textvqa_root(tmp_path)
    benchmark = TextVQA(with_ocr=False)
    assert benchmark.name == "textvqa_noocr"
    items = benchmark.load(root, tmp_path / "cache")
    assert items[0].prompt == f"What brand?{SHORT_ANSWER}"
    assert items[2].prompt == f"what number?{SHORT_ANSWER}"
    assert all("Reference OCR token" not in item.prompt for item in items)


def test_textvqa_missing_ground_truth_names_file_and_question(tmp_path: Path) -> None:
    root = textvqa_root(tmp_path)
    path = root / "textvqa" / "llava_textvqa_val_v051_ocr.jsonl"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"question_id": "img2", "image": "img2.jpg", "text": f"Who?{SHORT_ANSWER}"}) + "\n")
    with pytest.raises(EvalDataError, match=r"llava_textvqa_val_v051_ocr\.jsonl:4: question img2: no ground truth"):
        TextVQA().load(root, tmp_path / "cache")


def test_textvqa_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    root = textvqa_root(tmp_path)
    path = root / "textvqa" / "llava_textvqa_val_v051_ocr.jsonl"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"question_id": "img9", "image": \n')
    with pytest.raises(EvalDataError, match=r"llava_textvqa_val_v051_ocr\.jsonl:4: not valid JSON"):
        TextVQA().load(root, tmp_path / "cache")


# --- GQA ------------------------------------------------------------------------------------------


def gqa_root(tmp_path: Path, image: str = "n1.jpg") -> Path:
    folder = tmp_path / "gqa"
    make_image(folder / "data" / "images" / "n1.jpg")
    write_jsonl(
        folder / "llava_gqa_testdev_balanced.jsonl",
        [
            {"question_id": "201", "image": image, "text": f"Is it red?{SHORT_ANSWER}"},
            {"question_id": "202", "image": "n1.jpg", "text": f"What is it?{SHORT_ANSWER}"},
        ],
    )
    write_json(
        folder / "data" / "testdev_balanced_questions.json",
        {
            "201": {"imageId": "n1", "question": "Is it red?", "answer": "yes", "types": {"structural": "verify"}},
            "202": {"imageId": "n1", "question": "What is it?", "answer": "apple", "types": {"structural": "query"}},
        },
    )
    return tmp_path


def test_gqa_load_and_score(tmp_path: Path) -> None:
    root = gqa_root(tmp_path)
    benchmark = GQA()
    items = benchmark.load(root, tmp_path / "cache")
    assert [item.question_id for item in items] == ["201", "202"]
    assert items[0].image == str((root / "gqa" / "data" / "images" / "n1.jpg").resolve())
    assert items[1].reference["answer"] == "apple"

    score = benchmark.score(items, {"201": "Yes.", "202": "an apple"})
    assert score.score == pytest.approx(50.0)  # exact match: no article dropping
    assert score.metrics["structural/verify"] == 100.0 and score.metrics["structural/query"] == 0.0
    assert benchmark.score(items, {"202": "Apple"}).num_scored == 1


def test_gqa_missing_image_names_file_and_question(tmp_path: Path) -> None:
    root = gqa_root(tmp_path, image="absent.jpg")
    with pytest.raises(EvalDataError, match=r"llava_gqa_testdev_balanced\.jsonl:1: question 201: image .*absent\.jpg"):
        GQA().load(root, tmp_path / "cache")


def test_gqa_path_escaping_root_is_refused(tmp_path: Path) -> None:
    root = gqa_root(tmp_path, image="../x.png")
    make_image(root / "gqa" / "data" / "x.png")  # exists, but outside the image folder
    with pytest.raises(EvalDataError, match=r"llava_gqa_testdev_balanced\.jsonl:1: question 201: '\.\./x\.png' points"):
        GQA().load(root, tmp_path / "cache")


# --- VQAv2 ----------------------------------------------------------------------------------------


def vqav2_test_root(tmp_path: Path, with_all_questions: bool = True) -> Path:
    folder = tmp_path / "vqav2"
    make_image(folder / "test2015" / "COCO_test2015_000000000001.jpg")
    write_jsonl(
        folder / "llava_vqav2_mscoco_test-dev2015.jsonl",
        [
            {"question_id": 10, "image": "COCO_test2015_000000000001.jpg", "text": f"How many?{SHORT_ANSWER}"},
            {"question_id": 11, "image": "COCO_test2015_000000000001.jpg", "text": f"Color?{SHORT_ANSWER}"},
        ],
    )
    if with_all_questions:
        write_jsonl(
            folder / "llava_vqav2_mscoco_test2015.jsonl",
            [{"question_id": qid, "image": "x.jpg", "text": "q"} for qid in (9, 10, 11)],
        )
    return tmp_path


def test_vqav2_test_dev_is_server_scored(tmp_path: Path) -> None:
    root = vqav2_test_root(tmp_path)
    benchmark = VQAv2(split="test-dev")
    assert benchmark.name == "vqav2"
    items = benchmark.load(root, tmp_path / "cache")
    assert [item.question_id for item in items] == ["10", "11"]
    score = benchmark.score(items, {"10": "Two"})
    assert math.isnan(score.score) and score.num_scored == 0 and score.num_questions == 2
    assert "server" in score.metrics["note"]

    (path,) = benchmark.write_submission(items, {"10": "Two.", "11": "The Red"}, tmp_path / "out")
    assert json.loads(path.read_text()) == [
        {"question_id": 9, "answer": ""},
        {"question_id": 10, "answer": "2"},
        {"question_id": 11, "answer": "red"},
    ]


def test_vqav2_submission_without_test2015_file_covers_loaded_questions(tmp_path: Path) -> None:
    root = vqav2_test_root(tmp_path, with_all_questions=False)
    benchmark = VQAv2(split="test-dev")
    items = benchmark.load(root, tmp_path / "cache")
    (path,) = benchmark.write_submission(items, {"11": "blue"}, tmp_path / "out")
    assert json.loads(path.read_text()) == [{"question_id": 10, "answer": ""}, {"question_id": 11, "answer": "blue"}]


def vqav2_val_root(tmp_path: Path, annotated: tuple[int, ...] = (1, 2)) -> Path:
    folder = tmp_path / "vqav2"
    make_image(folder / "val2014" / "COCO_val2014_000000000042.jpg")
    write_json(
        folder / "v2_OpenEnded_mscoco_val2014_questions.json",
        {
            "questions": [
                {"question_id": 1, "image_id": 42, "question": "How many dogs?"},
                {"question_id": 2, "image_id": 42, "question": "Is it sunny?"},
            ]
        },
    )
    answers = {1: ["2"] * 3 + ["3"] * 7, 2: ["yes"] * 10}
    types = {1: "number", 2: "yes/no"}
    write_json(
        folder / "v2_mscoco_val2014_annotations.json",
        {
            "annotations": [
                {"question_id": qid, "answer_type": types[qid], "answers": [{"answer": a} for a in answers[qid]]}
                for qid in annotated
            ]
        },
    )
    return tmp_path


def test_vqav2_val_load_and_score(tmp_path: Path) -> None:
    root = vqav2_val_root(tmp_path)
    benchmark = VQAv2(split="val")
    assert benchmark.name == "vqav2_val"
    items = benchmark.load(root, tmp_path / "cache")
    assert items[0].prompt == f"How many dogs?{SHORT_ANSWER}"
    assert items[0].image == str((root / "vqav2" / "val2014" / "COCO_val2014_000000000042.jpg").resolve())
    score = benchmark.score(items, {"1": "two", "2": "no"})
    assert score.score == pytest.approx(100 * (0.9 + 0.0) / 2)
    assert score.metrics["answer_type/number"] == pytest.approx(90.0)
    assert score.metrics["answer_type/yes/no"] == 0.0


def test_vqav2_val_missing_annotation_names_file_and_question(tmp_path: Path) -> None:
    root = vqav2_val_root(tmp_path, annotated=(1,))
    with pytest.raises(EvalDataError, match=r"questions\.json: questions\[1\]: question 2: no ground truth"):
        VQAv2(split="val").load(root, tmp_path / "cache")


def test_vqav2_rejects_unknown_split() -> None:
    with pytest.raises(ValueError, match="split"):
        VQAv2(split="test")


# --- VizWiz ---------------------------------------------------------------------------------------


def test_vizwiz_test_submission(tmp_path: Path) -> None:
    folder = tmp_path / "vizwiz"
    make_image(folder / "test" / "VizWiz_test_00000000.jpg")
    make_image(folder / "test" / "VizWiz_test_00000001.jpg")
    prompt = f"What is this?{UNANSWERABLE_HINT}{SHORT_ANSWER}"
    write_jsonl(
        folder / "llava_test.jsonl",
        [
            {"question_id": 0, "image": "VizWiz_test_00000000.jpg", "text": prompt},
            {"question_id": 1, "image": "VizWiz_test_00000001.jpg", "text": prompt},
        ],
    )
    benchmark = VizWiz(split="test")
    assert benchmark.name == "vizwiz"
    items = benchmark.load(tmp_path, tmp_path / "cache")
    assert items[0].prompt == prompt
    score = benchmark.score(items, {"0": "x"})
    assert math.isnan(score.score) and score.num_scored == 0
    (path,) = benchmark.write_submission(items, {"0": "Unanswerable.", "1": "A can of soup"}, tmp_path / "out")
    assert json.loads(path.read_text()) == [
        {"image": "VizWiz_test_00000000.jpg", "answer": "unanswerable"},
        {"image": "VizWiz_test_00000001.jpg", "answer": "can of soup"},
    ]


def test_vizwiz_val_load_and_score(tmp_path: Path) -> None:
    folder = tmp_path / "vizwiz"
    make_image(folder / "val" / "VizWiz_val_00000000.jpg")
    make_image(folder / "val" / "VizWiz_val_00000001.jpg")
    write_json(
        folder / "val.json",
        [
            {
                "image": "VizWiz_val_00000000.jpg",
                "question": "What is this?",
                "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10,
                "answerable": 0,
                "answer_type": "unanswerable",
            },
            {
                "image": "VizWiz_val_00000001.jpg",
                "question": "What color?",
                "answers": [{"answer": "blue", "answer_confidence": "yes"}] + [{"answer": "navy"}] * 9,
                "answerable": 1,
                "answer_type": "other",
            },
        ],
    )
    benchmark = VizWiz(split="val")
    assert benchmark.name == "vizwiz_val"
    items = benchmark.load(tmp_path, tmp_path / "cache")
    assert items[0].question_id == "VizWiz_val_00000000.jpg"
    assert items[0].prompt == (
        "What is this?\nWhen the provided information is insufficient, respond with 'Unanswerable'."
        "\nAnswer the question using a single word or phrase."
    )
    score = benchmark.score(items, {"VizWiz_val_00000000.jpg": "Unanswerable", "VizWiz_val_00000001.jpg": "Blue."})
    assert score.score == pytest.approx(100 * (1.0 + 0.3) / 2)
    assert score.metrics["answer_type/other"] == pytest.approx(30.0)


def test_vizwiz_val_missing_image_names_file_and_question(tmp_path: Path) -> None:
    write_json(
        tmp_path / "vizwiz" / "val.json",
        [{"image": "VizWiz_val_00000007.jpg", "question": "q", "answers": [{"answer": "a"}]}],
    )
    with pytest.raises(EvalDataError, match=r"val\.json: \[0\]: question VizWiz_val_00000007\.jpg: image .* not found"):
        VizWiz(split="val").load(tmp_path, tmp_path / "cache")
