"""The terminal chat (llava.serve.cli): multi-turn requests with their image tags, commands, Ctrl-C while an
answer streams, and the real entry point as a subprocess."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llava.inference import load_pipeline
from llava.serve.cli import EXIT_INTERRUPTED, ChatSession
from llava.serve.engine import BatchingEngine

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def engine(chat_model):
    """One engine over the chat model on the CPU, as the CLI builds it."""
    model_dir, _ = chat_model
    engine = BatchingEngine(load_pipeline(model_dir, device="cpu"), max_batch=1, batch_wait_s=0)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def image(chat_model) -> str:
    _, playground = chat_model
    return str(sorted((playground / "images").glob("*.png"))[0])


def reader(lines: list[str]):
    """An ``input`` stand-in that returns ``lines`` in order, then raises EOFError."""
    pending = list(lines)

    def read_line(prompt: str) -> str:
        if not pending:
            raise EOFError
        return pending.pop(0)

    return read_line


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_multi_turn_with_an_image_keeps_its_tag_in_the_history(engine, image):
    out, err = io.StringIO(), io.StringIO()
    session = ChatSession(engine, out=out, err=err, max_tokens=8)
    assert session.add_image(image)
    first, second = "What shape is it?", "And its colour?"
    assert session.run(reader([first, second])) == 0
    assert err.getvalue() == ""

    assert len(session.requests) == 2
    assert session.requests[0] == {"prompt": first, "image": [image]}
    answer = session.turns[0][1]
    assert session.requests[1] == {"prompt": second, "image": [image], "history": [(f"<image>\n{first}", answer)]}
    # What streamed is each Finished.text (the kept answers), in order; EOF ends the line.
    answers = "".join(f"ASSISTANT: {text}\n" for _, text in session.turns)
    assert out.getvalue() == f"(image {image} joins your next message)\n{answers}\n"
    # The same answer as the batch pipeline's greedy one.
    expected = engine.pipeline.generate([{"image": image, "prompt": first}], max_new_tokens=8)[0]
    assert answer.strip() == expected.strip() and answer.strip()


def test_reset_forgets_turns_and_images_and_bad_images_are_refused(engine, image, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    out, err = io.StringIO(), io.StringIO()
    session = ChatSession(engine, out=out, err=err, max_tokens=3)
    lines = [f"/image {tmp_path / 'missing.png'}", f"/image {not_an_image}", f"/image {image}", "Hi", "/reset",
             "Hello", "/compression no-such-preset", "/compression none", "Again", "/quit", "never read"]  # fmt: skip
    assert session.run(reader(lines)) == 0

    errors = err.getvalue().splitlines()
    assert len(errors) == 3 and all(line.startswith("error: ") for line in errors)
    assert "missing.png" in errors[0] and "notes.png" in errors[1] and "no-such-preset" in errors[2]
    assert [request.get("image") for request in session.requests] == [[image], None, None]
    assert "history" not in session.requests[1]
    assert session.requests[2]["history"] == [("Hello", session.turns[0][1])]
    assert session.compression == "none" and len(session.turns) == 2


def test_help_lists_presets_and_ctrl_c_at_the_prompt_leaves_with_130(engine):
    def interrupted(prompt: str) -> str:
        raise KeyboardInterrupt

    out = io.StringIO()
    session = ChatSession(engine, out=out, err=io.StringIO())
    assert session.handle("/help") and "none" in out.getvalue() and "/compression" in out.getvalue()
    assert not session.handle("/exit")
    assert session.run(interrupted) == EXIT_INTERRUPTED == 130
    assert session.requests == []


class InterruptAfterFirstDelta(io.StringIO):
    """Output that raises KeyboardInterrupt (as Ctrl-C would, in the main thread) once the first answer text
    after ``ASSISTANT:`` has been written."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.fired = False

    def write(self, text: str) -> int:
        written = super().write(text)
        if self.armed and text and not self.fired:
            self.fired = True
            raise KeyboardInterrupt
        if text == "ASSISTANT: ":
            self.armed = True
        return written


def test_ctrl_c_while_streaming_stops_the_answer_and_the_chat_goes_on(engine, image):
    out, err = InterruptAfterFirstDelta(), io.StringIO()
    session = ChatSession(engine, out=out, err=err, max_tokens=200)
    cancelled = engine.stats.cancelled
    assert session.add_image(image)
    assert session.run(reader(["Describe the picture in detail.", "Hello"])) == 0

    assert out.fired and "\n[stopped]\n" in out.getvalue()
    assert wait_for(lambda: engine.stats.cancelled == cancelled + 1)
    assert wait_for(lambda: engine.stats.active == 0)
    assert err.getvalue() == ""
    partial = session.turns[0][1]
    assert partial and partial in out.getvalue().split("[stopped]")[0]
    # The partial answer is that turn's answer; the next turn is answered.
    assert session.requests[1]["history"] == [("<image>\nDescribe the picture in detail.", partial)]
    assert len(session.turns) == 2 and session.turns[1][1]


def cli(model_dir: Path, *arguments: str) -> list[str]:
    return [sys.executable, "-m", "llava.serve.cli", "--model", str(model_dir), "--device", "cpu", *arguments]


def test_entry_point_answers_two_turns_and_quits(chat_model, image):
    model_dir, _ = chat_model
    result = subprocess.run(
        cli(model_dir, "--image", image, "--max-new-tokens", "6"),
        input="What shape is it?\n/reset\nHello\n/quit\n", capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    answers = [line for line in result.stdout.split("USER: ") if line.startswith("ASSISTANT: ")]
    assert len(answers) == 2 and all(answer.removeprefix("ASSISTANT: ").strip() for answer in answers)
    assert "conversation and images forgotten" in result.stdout
    assert "Traceback" not in result.stderr


def test_entry_point_sigint_stops_the_answer_not_the_program(chat_model, image):
    model_dir, _ = chat_model
    process = subprocess.Popen(
        # --ignore-eos: the answer runs to its limit whatever the model writes, so Ctrl-C lands mid-answer.
        cli(model_dir, "--image", image, "--max-new-tokens", "1000", "--ignore-eos"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
        # A shell's background job (CI) inherits SIGINT ignored, and Python then keeps it ignored: give the
        # child the default disposition, as a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    chunks: list[bytes] = []

    def read() -> None:
        while chunk := os.read(process.stdout.fileno(), 4096):
            chunks.append(chunk)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()

    def stdout() -> str:
        return b"".join(chunks).decode("utf-8", errors="replace")

    try:
        process.stdin.write(b"Describe the picture in detail.\n")
        process.stdin.flush()
        # Wait for answer text (not only the ASSISTANT: prefix) before pressing Ctrl-C.
        assert wait_for(lambda: len(stdout().partition("ASSISTANT: ")[2]) >= 1, timeout=90), stdout()
        process.send_signal(signal.SIGINT)
        assert wait_for(lambda: "[stopped]" in stdout(), timeout=30), stdout()
        process.stdin.write(b"/quit\n")
        process.stdin.close()
        assert process.wait(timeout=30) == 0, process.stderr.read().decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    thread.join(timeout=5)
    text = stdout()
    answer = text.partition("ASSISTANT: ")[2].partition("\n[stopped]")[0]
    assert answer and "ASSISTANT: " not in answer  # cut mid-answer: one answer, ended by [stopped]
    assert "Traceback" not in process.stderr.read().decode()
