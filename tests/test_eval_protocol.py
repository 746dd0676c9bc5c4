"""Scoring protocols (issue 23): ``official`` reproduces the published scoring scripts (LLaVA's
eval_science_qa.py and convert_seed_for_submission.py, VLMEvalKit's MMBench exact matching, Video-ChatGPT's
judge), ``strict`` keeps the project's stricter reading. Every case below was worked out by hand from the
official code's rules; each deviation named in the issue has a case where the two protocols differ.
Also: ``--export official`` files read back, and ``--protocol``/``--export`` through the CLI with
``--score-only``."""

from __future__ import annotations

import base64
import csv
import io
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from llava.eval import run as run_cli
from llava.eval.answers import AnswerWriter, shard_file
from llava.eval.base import OPTION_LETTER, PROTOCOLS, EvalItem, Score, check_protocol
from llava.eval.benchmarks.choice import parse_option_letter, parse_seed_official, parse_sqa_official
from llava.eval.benchmarks.mmbench import MMBench, parse_mmbench_official
from llava.eval.benchmarks.seed import SEEDBench
from llava.eval.benchmarks.sqa import ScienceQA
from llava.eval.judge import JudgeConfig, judge_answers, parse_judgement_official
from llava.eval.registry import benchmark_names, get_benchmark
from tests.test_eval_videoqa import local_judge, send_completion


def write_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (255, 0, 0)).save(path)


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


# --- the contract ---------------------------------------------------------------------------------------


def test_protocols_and_unknown_protocol() -> None:
    assert PROTOCOLS == ("official", "strict")
    assert check_protocol("strict") == "strict"
    with pytest.raises(ValueError, match="lenient"):
        check_protocol("lenient")


@pytest.mark.parametrize("name", benchmark_names())
def test_every_benchmark_records_and_checks_the_protocol(name: str) -> None:
    benchmark = get_benchmark(name)
    for protocol in PROTOCOLS:
        assert benchmark.score([], {}, protocol=protocol).metrics["protocol"] == protocol
    assert benchmark.score([], {}).metrics["protocol"] == "official"  # the default
    with pytest.raises(ValueError, match="lenient"):
        benchmark.score([], {}, protocol="lenient")


# --- ScienceQA: LLaVA's eval_science_qa.py ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "num_options", "official", "strict"),
    [
        ("B", 3, "B", "B"),
        (" C ", 3, "C", "C"),  # both strip before the single-letter test
        ("A.", 2, None, "A"),  # the script needs "A. " (with the space): a bare "A." fails
        ("A. red", 2, "A", "A"),
        ("The answer is D,", 4, "D", None),  # the script's second regex has no period
        ("The answer is B. The answer is C.", 4, "B", None),  # first match; strict wants exactly one
        ("The answer is E.", 4, None, None),  # E is no option of a four-option question
        ("B\nbecause it is", 3, "B", None),  # newlines become ". " first: "B. because it is"
        ("AB", 3, None, None),
        ("It is A", 2, None, None),
    ],
)
def test_sqa_parsing(text: str, num_options: int, official: str | None, strict: str | None) -> None:
    assert parse_sqa_official(text, num_options) == official
    assert parse_option_letter(text, "ABCDE"[:num_options]) == strict


def make_sqa(root: Path) -> None:
    """llava_test_CQM-A.json as LLaVA ships it: string ids, "<image>\\n" first in the human turn, the
    answer letter as the gpt turn; one text-only question."""
    folder = root / "scienceqa"
    records: list[dict[str, Any]] = []
    for number, answer in zip(("4", "5", "11"), "ABA", strict=True):
        human = f"<image>\nContext: Select the best answer.\nWhich is it {number}?\nA. red\nB. blue"
        records.append(
            {
                "id": number,
                "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}],
                "image": "image.png",
            }
        )
        write_image(folder / "images" / "test" / number / "image.png")
    records.append(
        {
            "id": "12",
            "conversations": [
                {"from": "human", "value": "Context: N/A\nWhich?\nA. x\nB. y\nC. z"},
                {"from": "gpt", "value": "C"},
            ],
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "llava_test_CQM-A.json").write_text(json.dumps(records))


def test_sqa_score_under_both_protocols(tmp_path: Path) -> None:
    make_sqa(tmp_path)
    items = ScienceQA().load(tmp_path, tmp_path / "cache")
    predictions = {"4": "A.", "5": "The answer is B,", "11": "The answer is A, since red"}
    official = ScienceQA().score(items, predictions)  # 4 wrong (bare "A."), 5 and 11 right
    strict = ScienceQA().score(items, predictions, protocol="strict")  # 4 right, 5 and 11 unparseable
    assert official.score == pytest.approx(200 / 3) and official.metrics["protocol"] == "official"
    assert strict.score == pytest.approx(100 / 3) and strict.metrics["protocol"] == "strict"


def test_sqa_export_reads_back_as_llava_answers(tmp_path: Path) -> None:
    make_sqa(tmp_path)
    benchmark = ScienceQA(image_only=False)
    items = benchmark.load(tmp_path, tmp_path / "cache")
    (path,) = benchmark.export_official(items, {"4": "A", "12": "C", "5": "B."}, tmp_path / "export")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [record["question_id"] for record in records] == ["4", "5", "12"]  # file order, answered only
    assert [record["text"] for record in records] == ["A", "B.", "C"]
    # eval_science_qa.py counts IMG accuracy by "<image>" in the prompt: image questions carry it first
    assert records[0]["prompt"] == "<image>\nContext: Select the best answer.\nWhich is it 4?\nA. red\nB. blue" + (
        OPTION_LETTER
    )
    assert "<image>" not in records[2]["prompt"]


# --- SEED-Bench: LLaVA's convert_seed_for_submission.py --------------------------------------------------


@pytest.mark.parametrize(
    ("text", "official", "strict"),
    [
        ("B", "B", "B"),
        ("B.", None, "B"),
        ("C. text", None, "C"),
        ("The answer is A.", None, "A"),
        ("E", None, None),
    ],
)
def test_seed_parsing(text: str, official: str | None, strict: str | None) -> None:
    assert parse_seed_official(text, "ABCD") == official
    assert parse_option_letter(text, "ABCD") == strict


def make_seed(root: Path) -> None:
    """LLaVA's llava-seed-bench.jsonl (integer ids, options and suffix in the text) and SEED-Bench.json
    (string ids, listed in another order)."""
    folder = root / "seed_bench"
    questions, truth = [], []
    for number, (data_type, type_id, answer) in enumerate([("image", 1, "A"), ("image", 2, "B"), ("video", 10, "C")]):
        image = f"SEED-Bench-image/{number}.jpg" if data_type == "image" else f"SEED-Bench-video-image/{number}.png"
        write_image(folder / image)
        text = f"Question {number}?\nA. a\nB. b\nC. c\nD. d" + OPTION_LETTER
        questions.append({"image": image, "text": text, "category": "x", "question_id": 100 + number})
        truth.append(
            {"question_id": str(100 + number), "data_type": data_type, "answer": answer, "question_type_id": type_id}
        )
    write_jsonl(folder / "llava-seed-bench.jsonl", questions)
    types = {"Scene Understanding": 1, "Instance Identity": 2, "Action Recognition": 10}
    data = {"questions": truth[::-1], "question_type": types}
    (folder / "SEED-Bench.json").write_text(json.dumps(data))


def test_seed_score_under_both_protocols(tmp_path: Path) -> None:
    make_seed(tmp_path)
    items = SEEDBench().load(tmp_path, tmp_path / "cache")
    predictions = {"100": "A", "101": "B.", "102": "The answer is C."}
    official = SEEDBench().score(items, predictions)  # only the exact "A" counts
    assert (official.score, official.metrics["video"], official.metrics["all"]) == pytest.approx((50.0, 0.0, 100 / 3))
    strict = SEEDBench().score(items, predictions, protocol="strict")
    assert (strict.score, strict.metrics["video"], strict.metrics["all"]) == pytest.approx((100.0, 100.0, 100.0))
    assert (official.metrics["protocol"], strict.metrics["protocol"]) == ("official", "strict")


def test_seed_export_reads_back(tmp_path: Path) -> None:
    make_seed(tmp_path)
    items = SEEDBench().load(tmp_path, tmp_path / "cache")
    answers, upload = SEEDBench().export_official(items, {"100": "A", "101": "B.", "102": "C"}, tmp_path / "out")
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [(row["question_id"], row["text"]) for row in rows] == [(100, "A"), (101, "B."), (102, "C")]
    assert rows[0]["prompt"] == items[0].prompt
    uploaded = [json.loads(line) for line in upload.read_text().splitlines()]
    # SEED-Bench.json's ids (strings) in its order, the raw answer as "prediction"
    assert uploaded == [
        {"question_id": "102", "prediction": "C"},
        {"question_id": "101", "prediction": "B."},
        {"question_id": "100", "prediction": "A"},
    ]


# --- MMBench: VLMEvalKit's exact matching ------------------------------------------------------------------

OPTIONS = {"A": "blue", "B": "red", "C": "green"}


@pytest.mark.parametrize(
    ("text", "official", "strict"),
    [
        ("C", "C", "C"),
        ("C. green", "C", "C"),
        ("(C)", "C", None),
        ("Answer: A", "A", None),
        ("green", "C", None),  # one option text in the answer
        ("It is Green!", "C", None),  # case-insensitive
        ("A cat", "A", None),  # "A" as a word counts, even as an article
        ("A or B", None, None),  # two letters, and no single option text
        ("blue or red", None, None),  # two option texts
        ("The answer is B.", "B", "B"),
        ("Cannot determine the answer", "Z", None),  # a refusal: VLMEvalKit's "Z", scored wrong
        ("Z", "Z", None),
        ("D", None, None),  # not an option of this row; "d" is not an option text either
        ("Failed to obtain answer via API: red", "B", None),  # letter stage skipped, text stage reads "red"
    ],
)
def test_mmbench_parsing(text: str, official: str | None, strict: str | None) -> None:
    assert parse_mmbench_official(text, dict(OPTIONS)) == official
    assert parse_option_letter(text, "".join(OPTIONS)) == strict


def png_base64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (0, 0, 255)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


MMBENCH_HEADER = [
    "index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
    "comment", "split",
]  # fmt: skip


def make_mmbench(root: Path) -> None:
    """mmbench_dev_20230712.tsv's columns in its order; copies at index + 1_000_000 with shifted options,
    the copy's image a reference to the original row."""
    image = png_base64()
    rows = [
        ["0", "What color?", "A sky.", "blue", "red", "green", "", "A", "color", image, "s", "attr", "nan", "dev"],
        ["1000000", "What color?", "A sky.", "red", "green", "blue", "", "C", "color", "0", "s", "attr", "nan", "dev"],
        ["1", "Is it round?", "nan", "yes", "no", "", "", "B", "shape", image, "s", "attr", "nan", "dev"],
        ["1000001", "Is it round?", "nan", "no", "yes", "", "", "A", "shape", "1", "s", "attr", "nan", "dev"],
    ]
    folder = root / "mmbench"
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(MMBENCH_HEADER)] + ["\t".join(row) for row in rows]
    (folder / "mmbench_dev_20230712.tsv").write_text("\n".join(lines) + "\n")


def test_mmbench_score_under_both_protocols(tmp_path: Path) -> None:
    make_mmbench(tmp_path)
    items = MMBench().load(tmp_path, tmp_path / "cache")
    # question 0: "(A)" then "blue" (the copy's option C); question 1: "B" then "Answer: A"
    predictions = {"0": "(A)", "1000000": "blue", "1": "B", "1000001": "Answer: A"}
    official = MMBench().score(items, predictions)  # every row right -> both questions right
    assert (official.score, official.metrics["plain_accuracy"]) == pytest.approx((100.0, 100.0))
    strict = MMBench().score(items, predictions, protocol="strict")  # only "B" parses
    assert (strict.score, strict.metrics["plain_accuracy"]) == pytest.approx((0.0, 25.0))
    assert (official.metrics["protocol"], strict.metrics["protocol"]) == ("official", "strict")


def test_mmbench_export_has_the_upload_columns(tmp_path: Path) -> None:
    make_mmbench(tmp_path)
    items = MMBench().load(tmp_path, tmp_path / "cache")
    (path,) = MMBench().export_official(items, {"0": "A", "1": "The answer\tis B", "1000001": "A"}, tmp_path / "x")
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    # convert_mmbench_for_submission.py: drop hint/category/source/image/comment/l2-category, insert
    # "prediction" as the 7th column
    assert list(rows[0]) == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert [row["index"] for row in rows] == ["0", "1000000", "1", "1000001"]
    assert [row["prediction"] for row in rows] == ["A", "", "The answer\tis B", "A"]  # none for 1000000
    assert (rows[1]["A"], rows[1]["C"], rows[1]["answer"]) == ("red", "blue", "C")
    assert rows[2]["C"] == "" and rows[2]["split"] == "dev"


# --- the video QA judge: Video-ChatGPT's evaluate_*_qa.py --------------------------------------------------

# Typed from Video-ChatGPT's quantitative_evaluation/evaluate_activitynet_qa.py, as Python joins its
# adjacent string literals (no separator between them).
OFFICIAL_SYSTEM = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for "
    "question-answer pairs. Your task is to compare the predicted answer with the correct answer and "
    "determine if they match meaningfully. Here's how you can accomplish the task:------##INSTRUCTIONS: - "
    "Focus on the meaningful match between the predicted answer and the correct answer.\n- Consider synonyms "
    "or paraphrases as valid matches.\n- Evaluate the correctness of the prediction compared to the answer."
)
OFFICIAL_USER = (
    "Please evaluate the following video-based question-answer pair:\n\nQuestion: {q}\nCorrect Answer: {a}\n"
    "Predicted Answer: {p}\n\nProvide your evaluation only as a yes/no and score where the score is an integer "
    "value between 0 and 5, with 5 indicating the highest meaningful match. Please generate the response in "
    "the form of a Python dictionary string with keys 'pred' and 'score', where value of 'pred' is  a string "
    "of 'yes' or 'no' and value of 'score' is in INTEGER, not STRING.DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR "
    "EXPLANATION. Only provide the Python dictionary string. For example, your response should look like "
    "this: {{'pred': 'yes', 'score': 4.8}}."
)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("{'pred': 'yes', 'score': 4.8}", ("yes", 4)),  # int() truncates
        ("{'pred': 'not sure', 'score': 2}", ("no", 2)),  # contains "no"
        ("{'pred': 'Yes, mostly', 'score': '3'}", ("yes", 3)),
        ("{'pred': 'maybe', 'score': 1}", ("neither", 1)),
    ],
)
def test_official_judgement_reading(reply: str, expected: tuple[str, int]) -> None:
    assert parse_judgement_official(reply) == expected


class StubJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible stub whose reply depends on the predicted answer it is shown."""

    replies = {
        "p-frac": "{'pred': 'yes', 'score': 4.8}",
        "p-unsure": "{'pred': 'not sure', 'score': 2}",
        "p-neither": "{'pred': 'maybe', 'score': 3}",
        "p-fenced": "```python\n{'pred': 'yes', 'score': 5}\n```",
        "p-no": "{'pred': 'no', 'score': 0}",
        "p-strscore": "{'pred': 'Yes', 'score': '3'}",
    }
    bodies: list[dict[str, Any]] = []
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            self.bodies.append(body)
        prediction = body["messages"][1]["content"].split("Predicted Answer: ")[1].split("\n")[0]
        send_completion(self, self.replies[prediction])

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def stub_judge(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    StubJudge.bodies = []
    with local_judge(StubJudge, monkeypatch) as url:
        yield url


def video_items() -> list[EvalItem]:
    names = ["p-frac", "p-unsure", "p-neither", "p-fenced", "p-no", "p-strscore"]
    return [
        EvalItem(name, f"what is {index}?", reference={"answer": f"ans {index}"}) for index, name in enumerate(names)
    ]


def test_official_judge_sends_the_prompts_verbatim_and_scores_as_video_chatgpt(stub_judge: str) -> None:
    items = video_items()
    config = JudgeConfig(url=stub_judge, model="stub", max_retries=2, backoff_s=0.001, workers=2)

    result = judge_answers(items, {item.question_id: item.question_id for item in items}, config)

    first = next(body for body in StubJudge.bodies if "Predicted Answer: p-frac\n" in body["messages"][1]["content"])
    assert first["messages"][0] == {"role": "system", "content": OFFICIAL_SYSTEM}
    assert first["messages"][1] == {
        "role": "user",
        "content": OFFICIAL_USER.format(q="what is 0?", a="ans 0", p="p-frac"),
    }
    assert "temperature" not in first  # the official script sends none
    # judged: frac yes 4, unsure no 2, neither 3, no 0, strscore yes 3; fenced never parses
    assert result["judgements"] == {
        "p-frac": {"pred": "yes", "score": 4.0},
        "p-unsure": {"pred": "no", "score": 2.0},
        "p-neither": {"pred": "neither", "score": 3.0},
        "p-no": {"pred": "no", "score": 0.0},
        "p-strscore": {"pred": "yes", "score": 3.0},
    }
    assert (result["num_yes"], result["num_no"], result["num_neither"]) == (2, 2, 1)
    assert result["accuracy"] == pytest.approx(50.0)  # 2 / (2 + 2)
    assert result["score"] == pytest.approx((4 + 2 + 3 + 0 + 3) / 5)
    assert list(result["failures"]) == ["p-fenced"]
    fenced = sum("Predicted Answer: p-fenced\n" in body["messages"][1]["content"] for body in StubJudge.bodies)
    assert fenced == 3  # asked again while the reply does not parse: 1 + max_retries
    assert (result["protocol"], result["temperature"]) == ("official", None)


def test_strict_judge_keeps_the_earlier_reading(stub_judge: str) -> None:
    items = video_items()
    config = JudgeConfig(url=stub_judge, model="stub", max_retries=2, backoff_s=0.001, workers=2)

    result = judge_answers(items, {item.question_id: item.question_id for item in items}, config, protocol="strict")

    first = StubJudge.bodies[0]
    assert first["temperature"] == 0.0
    assert first["messages"][0]["content"] != OFFICIAL_SYSTEM
    # judged: frac yes 4.8, fenced yes 5, no 0, strscore yes 3; "not sure" and "maybe" are failures
    assert (result["num_yes"], result["num_no"], result["num_judged"]) == (3, 1, 4)
    assert result["accuracy"] == pytest.approx(75.0)
    assert result["score"] == pytest.approx((4.8 + 5 + 0 + 3) / 4)
    assert sorted(result["failures"]) == ["p-neither", "p-unsure"]
    assert len(StubJudge.bodies) == 6  # a bad reply is not asked again


def test_judge_temperature_only_when_asked(stub_judge: str) -> None:
    items = video_items()[:1]
    config = JudgeConfig(url=stub_judge, temperature=0.2, workers=1)
    judge_answers(items, {"p-frac": "p-frac"}, config)
    judge_answers(items, {"p-frac": "p-frac"}, config, protocol="strict")
    assert [body["temperature"] for body in StubJudge.bodies] == [0.2, 0.2]


def test_video_export_is_video_chatgpt_prediction_file(tmp_path: Path) -> None:
    folder = tmp_path / "GPT_Zero_Shot_QA" / "MSVD_Zero_Shot_QA"
    (folder / "videos").mkdir(parents=True)
    for name in ("clip1", "clip2"):
        (folder / "videos" / f"{name}.avi").write_bytes(b"not a video")
    questions = [
        {"video_name": "clip1", "question": "what is the man doing?", "question_id": "v_clip1_0"},
        {"video_name": "clip2", "question": "who is cooking?", "question_id": "v_clip2_1"},
        {"video_name": "clip1", "question": "how many dogs?", "question_id": "v_clip1_2"},
    ]
    answers = [{"answer": "two", "type": 3, "question_id": "v_clip1_2"}, {"answer": "cooking", "type": 0,
               "question_id": "v_clip1_0"}, {"answer": "woman", "type": 1, "question_id": "v_clip2_1"}]  # fmt: skip
    (folder / "test_q.json").write_text(json.dumps(questions))
    (folder / "test_a.json").write_text(json.dumps(answers))
    benchmark = get_benchmark("msvd")
    items = benchmark.load(tmp_path, tmp_path / "cache")
    (path,) = benchmark.export_official(items, {"v_clip1_0": "he cooks", "v_clip1_2": "2"}, tmp_path / "x")
    assert json.loads(path.read_text()) == [
        {"video_name": "clip1", "Q": "what is the man doing?", "A": "cooking", "pred": "he cooks"},
        {"video_name": "clip1", "Q": "how many dogs?", "A": "two", "pred": "2"},
    ]


# --- the CLI: --protocol and --export with --score-only ----------------------------------------------------


class NoExport:
    """A benchmark without an official export format."""

    name = "noexport"
    score_name = "exact match"

    def load(self, root: Path, cache_dir: Path) -> list[EvalItem]:
        return [EvalItem("q0", "Which?", reference={"answer": "A"})]

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, str], protocol: str = "official") -> Score:
        check_protocol(protocol)
        right = sum(predictions.get(item.question_id) == item.reference["answer"] for item in items)
        return Score(100.0 * right / len(items), {"protocol": protocol}, len(predictions), len(items))


def write_answers(folder: Path, answers: Mapping[str, str]) -> None:
    with AnswerWriter(shard_file(folder, 0, 1)) as writer:
        writer.write(
            {"question_id": key, "prompt": "", "text": text, "preset": "checkpoint"} for key, text in answers.items()
        )


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_cli_score_only_with_protocol_and_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], protocol: str
) -> None:
    from llava.eval import registry

    monkeypatch.setitem(registry._BENCHMARKS, "noexport", ("tests.test_eval_protocol:NoExport", {}))
    root, out = tmp_path / "data", tmp_path / "out"
    make_sqa(root)
    write_answers(out / "checkpoint" / "sqa", {"4": "A.", "5": "The answer is B,", "11": "The answer is A,"})
    write_answers(out / "checkpoint" / "noexport", {"q0": "A"})
    argv = ["--model", "unused", "--root", str(root), "--benchmarks", "sqa,noexport", "--out", str(out),
            "--score-only", "--protocol", protocol, "--export", "official"]  # fmt: skip

    sqa, other = run_cli.main(argv)

    # official: "A." fails, the other two count; strict: only "A." counts
    assert sqa["score"] == pytest.approx({"official": 200 / 3, "strict": 100 / 3}[protocol])
    assert sqa["protocol"] == protocol
    saved = json.loads((out / "checkpoint" / "sqa" / "result.json").read_text())
    assert saved["protocol"] == protocol and saved["metrics"]["protocol"] == protocol
    export = out / "checkpoint" / "sqa" / "export-official" / "llava_answers.jsonl"
    assert saved["export_files"] == [str(export)]
    assert [json.loads(line)["question_id"] for line in export.read_text().splitlines()] == ["4", "5", "11"]
    assert other["export_files"] is None and other["protocol"] == protocol
    assert not (out / "checkpoint" / "noexport" / "export-official").exists()
    printed = capsys.readouterr().out
    assert f"checkpoint/sqa [{protocol}]:" in printed and "none for this benchmark" in printed


def test_cli_refuses_an_unknown_protocol(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run_cli.parse_args(["--model", "m", "--benchmarks", "sqa", "--out", "o", "--protocol", "lenient"])
    assert "lenient" in capsys.readouterr().err
