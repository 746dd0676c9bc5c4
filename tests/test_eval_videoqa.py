"""Zero-shot video QA: loading the Video-ChatGPT layout, pairing answers by id, the offline metric, the judge."""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from llava.eval.base import EvalDataError, EvalItem
from llava.eval.benchmarks.videoqa import VideoQA, answer_matches, normalize_answer
from llava.eval.judge import JudgeConfig, JudgeError, judge_answers, parse_judgement
from llava.eval.registry import get_benchmark

# dataset -> (registry name, video folder, file name of video "clip1")
LAYOUTS = {
    "MSVD": ("msvd", "videos", "clip1.avi"),
    "MSRVTT": ("msrvtt", "videos/all", "clip1.mp4"),
    "TGIF": ("tgif", "mp4", "clip1.mp4"),
    "Activitynet": ("activitynet", "all_test", "v_clip1.mp4"),
}


def dataset_folder(root: Path, dataset: str) -> Path:
    return root / "GPT_Zero_Shot_QA" / f"{dataset}_Zero_Shot_QA"


def write_dataset(
    root: Path, dataset: str, questions: list[dict[str, Any]], answers: list[dict[str, Any]], videos: list[str]
) -> Path:
    """test_q.json, test_a.json and placeholder videos (paths relative to the video folder)."""
    folder = dataset_folder(root, dataset)
    video_dir = folder / LAYOUTS[dataset][1]
    video_dir.mkdir(parents=True, exist_ok=True)
    (folder / "test_q.json").write_text(json.dumps(questions))
    (folder / "test_a.json").write_text(json.dumps(answers))
    for video in videos:
        (video_dir / video).write_bytes(b"not really a video")
    return folder


QUESTIONS = [
    {"video_name": "clip1", "question": "what is the man doing?", "question_id": "v_clip1_0"},
    {"video_name": "clip2", "question": "who is cooking?", "question_id": "v_clip2_1"},
    {"video_name": "clip1", "question": "how many dogs are there?", "question_id": "v_clip1_2"},
]
ANSWERS = [  # a different order than QUESTIONS: pairing must go by question_id
    {"answer": "two", "type": 3, "question_id": "v_clip1_2"},
    {"answer": "cooking", "type": 0, "question_id": "v_clip1_0"},
    {"answer": "woman", "type": 1, "question_id": "v_clip2_1"},
]


def video_file(dataset: str, stem: str) -> str:
    return LAYOUTS[dataset][2].replace("clip1", stem)


@pytest.mark.parametrize("dataset", list(LAYOUTS))
def test_load_pairs_answers_by_id_in_each_layout(tmp_path: Path, dataset: str) -> None:
    folder = write_dataset(
        tmp_path, dataset, QUESTIONS, ANSWERS, [video_file(dataset, "clip1"), video_file(dataset, "clip2")]
    )
    benchmark = get_benchmark(LAYOUTS[dataset][0])
    assert isinstance(benchmark, VideoQA)
    assert benchmark.score_name == "accuracy (normalised match)"

    items = benchmark.load(tmp_path, tmp_path / "cache")

    assert [item.question_id for item in items] == ["v_clip1_0", "v_clip2_1", "v_clip1_2"]
    assert [item.reference["answer"] for item in items] == ["cooking", "woman", "two"]
    assert [item.reference["type"] for item in items] == [0, 1, 3]
    video_dir = (folder / LAYOUTS[dataset][1]).resolve()
    assert items[0].video == str(video_dir / video_file(dataset, "clip1"))
    assert items[1].video == str(video_dir / video_file(dataset, "clip2"))
    assert items[0].prompt == "what is the man doing?"
    assert items[0].image is None and items[0].max_new_tokens == 1024
    assert items[0].request() == {"prompt": "what is the man doing?", "video": items[0].video}


def test_video_names_with_extension_prefix_or_other_container(tmp_path: Path) -> None:
    questions = [
        {"video_name": "v_already.mp4", "question": "q1", "question_id": 1},
        {"video_name": "plain", "question": "q2", "question_id": 2},
        {"video_name": "v_prefixed", "question": "q3", "question_id": 3},
    ]
    answers = [{"answer": "a", "type": "x", "question_id": n} for n in (3, 1, 2)]
    folder = write_dataset(
        tmp_path, "Activitynet", questions, answers, ["v_already.mp4", "v_plain.webm", "v_prefixed.mkv"]
    )

    items = VideoQA("Activitynet", max_new_tokens=64).load(tmp_path, tmp_path / "cache")

    video_dir = (folder / "all_test").resolve()
    assert [item.video for item in items] == [
        str(video_dir / "v_already.mp4"),
        str(video_dir / "v_plain.webm"),
        str(video_dir / "v_prefixed.mkv"),
    ]
    assert [item.question_id for item in items] == ["1", "2", "3"]  # integer ids become strings
    assert {item.max_new_tokens for item in items} == {64}


def test_unknown_dataset_is_refused() -> None:
    with pytest.raises(ValueError, match="NExTQA"):
        VideoQA("NExTQA")


def test_missing_video_names_file_and_question(tmp_path: Path) -> None:
    write_dataset(tmp_path, "MSVD", QUESTIONS, ANSWERS, ["clip1.avi"])  # clip2 missing
    with pytest.raises(EvalDataError, match=r"test_q\.json.*v_clip2_1.*clip2"):
        VideoQA("MSVD").load(tmp_path, tmp_path / "cache")


def test_question_without_answer_names_answer_file(tmp_path: Path) -> None:
    write_dataset(tmp_path, "MSVD", QUESTIONS, ANSWERS[:2], ["clip1.avi", "clip2.avi"])
    with pytest.raises(EvalDataError, match=r"test_a\.json.*v_clip2_1"):
        VideoQA("MSVD").load(tmp_path, tmp_path / "cache")


def test_answer_without_question_names_question_file(tmp_path: Path) -> None:
    extra = [*ANSWERS, {"answer": "cat", "type": 0, "question_id": "v_clip9_9"}]
    write_dataset(tmp_path, "MSVD", QUESTIONS, extra, ["clip1.avi", "clip2.avi"])
    with pytest.raises(EvalDataError, match=r"test_q\.json.*v_clip9_9"):
        VideoQA("MSVD").load(tmp_path, tmp_path / "cache")


@pytest.mark.parametrize("file_name", ["test_q.json", "test_a.json"])
def test_duplicate_id_names_file_and_id(tmp_path: Path, file_name: str) -> None:
    questions, answers = list(QUESTIONS), list(ANSWERS)
    if file_name == "test_q.json":
        questions.append({**QUESTIONS[1], "question": "again?"})
    else:
        answers.append({**ANSWERS[2], "answer": "man"})
    write_dataset(tmp_path, "MSVD", questions, answers, ["clip1.avi", "clip2.avi"])
    with pytest.raises(EvalDataError, match=re.escape(f"{file_name}: duplicate question_id 'v_clip2_1'")):
        VideoQA("MSVD").load(tmp_path, tmp_path / "cache")


def test_video_name_leaving_the_video_folder_is_refused(tmp_path: Path) -> None:
    questions = [{"video_name": "../secret", "question": "q", "question_id": "q0"}]
    answers = [{"answer": "a", "type": 0, "question_id": "q0"}]
    folder = write_dataset(tmp_path, "MSVD", questions, answers, [])
    (folder / "secret.avi").write_bytes(b"exists, but outside videos/")
    with pytest.raises(EvalDataError, match=r"q0.*points outside"):
        VideoQA("MSVD").load(tmp_path, tmp_path / "cache")


def test_missing_field_and_missing_file(tmp_path: Path) -> None:
    write_dataset(tmp_path, "TGIF", [{"video_name": "clip1", "question_id": "q0"}], [], ["clip1.mp4"])
    with pytest.raises(EvalDataError, match=r"test_q\.json\[0\].*'q0'.*question"):
        VideoQA("TGIF").load(tmp_path, tmp_path / "cache")
    with pytest.raises(EvalDataError, match=r"test_q\.json: file not found"):
        VideoQA("MSRVTT").load(tmp_path, tmp_path / "cache")


def test_normalisation_and_match_rule() -> None:
    assert normalize_answer("  The  Dog's   ball! ") == "dog s ball"
    assert normalize_answer("An apple, a pear.") == "apple pear"
    assert answer_matches("A dog.", "dog")
    assert answer_matches("The man is cooking food.", "cooking")
    assert answer_matches("a red car", "red car")
    assert not answer_matches("cooks", "cooking")  # no stemming
    assert not answer_matches("hotdog", "dog")  # whole words only
    assert not answer_matches("car red", "red car")  # phrase order matters
    assert not answer_matches("anything", "the")  # empty reference matches only an empty prediction
    assert answer_matches("", "the")


def make_items(answers: list[tuple[str, str, Any]]) -> list[EvalItem]:
    return [
        EvalItem(question_id=qid, prompt=f"question {qid}?", video="/v.mp4", reference={"answer": a, "type": t})
        for qid, a, t in answers
    ]


def test_score_overall_and_per_type() -> None:
    items = make_items(
        [
            ("1", "dog", "what"),
            ("2", "cooking", "what"),
            ("3", "two", "how many"),
            ("4", "woman", "who"),
            ("5", "yes", "who"),  # no prediction: not scored
        ]
    )
    predictions = {"1": "A Dog.", "2": "He cooks.", "3": "There are two dogs", "4": "a woman", "99": "ignored"}

    score = VideoQA("MSVD").score(items, predictions)

    assert (score.num_scored, score.num_questions, score.complete) == (4, 5, False)
    assert score.score == pytest.approx(75.0)
    assert score.metrics["accuracy"] == pytest.approx(75.0)
    assert score.metrics["num_correct"] == 3
    assert score.metrics["accuracy/what"] == pytest.approx(50.0)
    assert score.metrics["accuracy/how many"] == pytest.approx(100.0)
    assert score.metrics["accuracy/who"] == pytest.approx(100.0)
    assert score.metrics["num_scored/who"] == 1


def test_score_without_predictions_is_zero() -> None:
    score = VideoQA("TGIF").score(make_items([("1", "dog", 0)]), {})
    assert (score.score, score.num_scored, score.num_questions) == (0.0, 0, 1)


# --- the judge ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("{'pred': 'yes', 'score': 4}", (True, 4.0)),
        ('{"pred": "no", "score": 1}', (False, 1.0)),
        ("```python\n{'pred': 'Yes', 'score': '5'}\n```", (True, 5.0)),
        ("Sure! {'pred': 'no', 'score': 0.5} Hope this helps.", (False, 0.5)),
    ],
)
def test_parse_judgement_accepts_json_and_python_literals(reply: str, expected: tuple[bool, float]) -> None:
    assert parse_judgement(reply) == expected


@pytest.mark.parametrize(
    "reply",
    [
        "yes, score 4",
        "{'pred': 'maybe', 'score': 3}",
        "{'pred': 'yes', 'score': 7}",
        "{'pred': 'yes'}",
        "{__import__('os').getcwd()}",
    ],
)
def test_parse_judgement_rejects_malformed_replies(reply: str) -> None:
    with pytest.raises(JudgeError):
        parse_judgement(reply)


def test_config_from_arguments_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DUET_JUDGE_URL", raising=False)
    monkeypatch.delenv("DUET_JUDGE_MODEL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="DUET_JUDGE_URL"):
        JudgeConfig.from_env()
    monkeypatch.setenv("DUET_JUDGE_URL", "http://judge:8000/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", "env-key")
    config = JudgeConfig.from_env(workers=2)
    assert (config.endpoint, config.model, config.api_key, config.workers) == (
        "http://judge:8000/v1/chat/completions",
        "gpt-3.5-turbo",
        "env-key",
        2,
    )
    monkeypatch.setenv("DUET_JUDGE_MODEL", "qwen")
    explicit = JudgeConfig.from_env(url="http://other/v1/chat/completions", api_key="arg-key")
    assert explicit.endpoint == "http://other/v1/chat/completions"
    assert (explicit.model, explicit.api_key) == ("qwen", "arg-key")


class StubJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat-completions stub whose reply depends on the predicted answer it is shown."""

    replies = {
        "pred-right": "{'pred': 'yes', 'score': 5}",
        "pred-wrong": '{"pred": "no", "score": 1}',
        "pred-garbage": "I think it is mostly right.",
        "pred-flaky": "{'pred': 'yes', 'score': 3}",
    }
    requests: list[tuple[str, str | None, dict[str, Any]]] = []
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prediction = body["messages"][1]["content"].split("Predicted Answer: ")[1].split("\n")[0]
        with self.lock:
            self.requests.append((self.path, self.headers.get("Authorization"), body))
            attempts = sum(1 for _, _, seen in self.requests if seen == body)
        if prediction == "pred-down" or (prediction == "pred-flaky" and attempts == 1):
            self.send_error(503 if prediction == "pred-down" else 500)
            return
        if prediction == "pred-rejected":
            self.send_error(400)
            return
        send_completion(self, self.replies[prediction])

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output quiet
        pass


def send_completion(handler: BaseHTTPRequestHandler, content: str) -> None:
    """Answer a chat-completions request with one choice holding ``content``."""
    payload = json.dumps({"object": "chat.completion", "choices": [{"index": 0, "message": {"content": content}}]})
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload.encode())


@contextlib.contextmanager
def local_judge(handler: type[BaseHTTPRequestHandler], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Serve ``handler`` on a free loopback port (no proxy in the way); yields its ``/v1`` base URL."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def stub_judge(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    StubJudge.requests = []
    with local_judge(StubJudge, monkeypatch) as url:
        yield url


def test_judge_accuracy_score_failures_and_retries(stub_judge: str) -> None:
    items = make_items(
        [
            ("a", "dog", 0),
            ("b", "cat", 0),
            ("c", "bird", 0),
            ("d", "fish", 0),
            ("e", "cow", 0),
            ("f", "pig", 0),
            ("g", "ant", 0),  # no prediction: not judged
        ]
    )
    predictions = {
        "a": "pred-right",
        "b": "pred-wrong",
        "c": "pred-garbage",
        "d": "pred-flaky",
        "e": "pred-down",
        "f": "pred-rejected",
    }
    config = JudgeConfig(url=stub_judge, model="stub-model", api_key="test-key", max_retries=2, backoff_s=0.001)

    result = judge_answers(items, predictions, config, protocol="strict")

    assert result["num_judged"] == 3 and result["num_yes"] == 2
    assert result["accuracy"] == pytest.approx(100 * 2 / 3)  # yes / (yes + no), unparseable excluded
    assert result["score"] == pytest.approx((5 + 1 + 3) / 3)
    assert result["num_failed"] == 3 and result["num_questions"] == 7
    assert list(result["failures"]) == ["c", "e", "f"]
    assert "unparseable" in result["failures"]["c"] or "no dictionary" in result["failures"]["c"]
    assert "HTTP 503" in result["failures"]["e"] and "HTTP 400" in result["failures"]["f"]
    assert result["judgements"] == {
        "a": {"pred": "yes", "score": 5.0},
        "b": {"pred": "no", "score": 1.0},
        "d": {"pred": "yes", "score": 3.0},
    }

    sent = StubJudge.requests
    per_prediction = {p: sum(p in body["messages"][1]["content"] for _, _, body in sent) for p in predictions.values()}
    assert per_prediction == {
        "pred-right": 1,
        "pred-wrong": 1,
        "pred-garbage": 1,  # a bad reply is not retried
        "pred-flaky": 2,  # 500, then success
        "pred-down": 3,  # 503 on the first try and both retries
        "pred-rejected": 1,  # 400 is not retryable
    }
    assert {path for path, _, _ in sent} == {"/v1/chat/completions"}
    assert {auth for _, auth, _ in sent} == {"Bearer test-key"}
    first = next(body for _, _, body in sent if "pred-right" in body["messages"][1]["content"])
    assert first["model"] == "stub-model" and first["temperature"] == 0.0  # strict sends 0 unless asked
    assert "Question: question a?\nCorrect Answer: dog\nPredicted Answer: pred-right" in first["messages"][1]["content"]


def test_judge_without_key_sends_no_authorization(stub_judge: str) -> None:
    config = JudgeConfig(url=stub_judge, workers=1)
    result = judge_answers(make_items([("a", "dog", 0)]), {"a": "pred-right"}, config, protocol="strict")
    assert (result["accuracy"], result["score"], result["num_failed"]) == (100.0, 5.0, 0)
    assert [auth for _, auth, _ in StubJudge.requests] == [None]
