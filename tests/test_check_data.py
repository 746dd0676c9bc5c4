"""The check_data CLI: a clean dataset passes, a broken one fails and says where."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from llava.data.templates import VICUNA_SYSTEM
from llava.playground.tokenizer import train_playground_tokenizer
from llava.tools.check_data import main


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    corpus = [VICUNA_SYSTEM, "USER: What is shown? ASSISTANT: A red square on a white page."]
    directory = tmp_path_factory.mktemp("tokenizer")
    train_playground_tokenizer(corpus * 4, vocab_size=400).save_pretrained(directory)
    return directory


def qa(question: str = "What is shown?", answer: str = "A red square.") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(folder / "ok.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8 truncated")
    return folder


def run_check(tmp_path, tokenizer_dir, image_folder, files, *extra) -> tuple[int, dict]:
    report_path = tmp_path / "report.json"
    argv = ["--data_path", *map(str, files), "--image_folder", str(image_folder), "--tokenizer", str(tokenizer_dir)]
    argv += ["--model_max_length", "256", "--tokens_per_image", "64", "--json-report", str(report_path), *extra]
    code = main(argv)
    return code, json.loads(report_path.read_text())


def test_clean_dataset_passes_with_statistics(tmp_path, tokenizer_dir, image_folder, capsys):
    data = tmp_path / "good.json"
    data.write_text(
        json.dumps([{"id": "a", "image": "ok.png", "conversations": qa()}, {"id": "b", "conversations": qa()}])
    )
    code, report = run_check(tmp_path, tokenizer_dir, image_folder, [data])
    assert code == 0 and report["num_problems"] == 0
    assert report["num_samples"] == 2 and report["num_text_only"] == 1
    assert report["stats"]["images_per_sample"]["max"] == 1
    total, text = report["stats"]["total_tokens"], report["stats"]["text_tokens"]
    assert total["min"] == text["min"]  # the text-only sample: no visual tokens
    assert total["max"] == text["max"] + 64  # the image sample: its sentinel counts as 64 tokens
    assert "samples: 2 (1 text-only)" in capsys.readouterr().out


def test_broken_dataset_fails_and_names_every_problem(tmp_path, tokenizer_dir, image_folder, capsys):
    first = tmp_path / "first.json"
    first.write_text(
        json.dumps(
            [
                {"id": "fine", "image": "ok.png", "conversations": qa()},
                {"id": "gone", "image": "missing.png", "conversations": qa()},
                {"id": "broken", "image": "corrupt.jpg", "conversations": qa()},
                {"id": "tags", "image": "ok.png", "conversations": qa("<image> <image>")},
                {"id": "long", "image": "ok.png", "conversations": qa(answer="word " * 300)},
            ]
        )
    )
    second = tmp_path / "second.json"
    second.write_text('[{"id": "x", ')
    code, report = run_check(tmp_path, tokenizer_dir, image_folder, [first, second])
    assert code == 1
    assert report["num_missing_images"] == 1
    assert report["num_corrupt_images"] == 1
    assert report["num_structural_errors"] == 1
    assert report["num_files_unreadable"] == 1
    assert report["num_over_max_length"] == 1
    problems = "\n".join(report["problems"])
    assert "first.json sample id='gone' (index 1): missing image" in problems
    assert "first.json sample id='broken' (index 2): corrupt image" in problems
    assert "first.json sample id='tags' (index 3)" in problems
    assert "second.json" in problems and "malformed JSON at line 1" in problems
    assert "first.json sample id='long' (index 4)" in report["over_length_examples"][0]
    output = capsys.readouterr().out
    assert "missing images: 1" in output and "corrupt images: 1" in output


def test_truncation_only_fails_on_request(tmp_path, tokenizer_dir, image_folder):
    data = tmp_path / "long.json"
    data.write_text(json.dumps([{"id": "long", "conversations": qa(answer="word " * 300)}]))
    assert run_check(tmp_path, tokenizer_dir, image_folder, [data])[0] == 0
    assert run_check(tmp_path, tokenizer_dir, image_folder, [data], "--fail-on-truncation")[0] == 1


def test_runs_as_a_module(tmp_path, tokenizer_dir, image_folder):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": "gone", "image": "missing.png", "conversations": qa()}]))
    argv = ["--data_path", str(data), "--image_folder", str(image_folder), "--tokenizer", str(tokenizer_dir)]
    result = subprocess.run(
        [sys.executable, "-m", "llava.tools.check_data", *argv], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1, result.stderr
    assert "missing images: 1" in result.stdout


def test_videos_are_checked_and_counted(tmp_path, tokenizer_dir, image_folder, capsys):
    import numpy as np

    from llava.data.video import write_video

    videos = tmp_path / "videos"
    frames = [np.full((32, 32, 3), value, dtype=np.uint8) for value in range(0, 250, 25)]
    write_video(videos / "ten.mp4", frames)
    write_video(videos / "two.mp4", frames[:2])
    (videos / "junk.mp4").write_bytes(b"junk" * 50)
    data = tmp_path / "video.json"
    data.write_text(
        json.dumps(
            [
                {"id": "good", "video": "ten.mp4", "image": "ok.png", "conversations": qa()},
                {"id": "short", "video": "two.mp4", "conversations": qa()},
                {"id": "junk", "video": "junk.mp4", "conversations": qa()},
                {"id": "gone", "video": "nope.mp4", "conversations": qa()},
            ]
        )
    )
    extra = ["--video_folder", str(videos), "--num_frames", "4", "--tokens_per_video", "100"]
    code, report = run_check(tmp_path, tokenizer_dir, image_folder, [data], *extra)
    assert code == 1
    assert report["num_missing_videos"] == 1 and report["num_bad_videos"] == 2
    assert report["stats"]["videos_per_sample"]["max"] == 1
    total, text = report["stats"]["total_tokens"], report["stats"]["text_tokens"]
    assert total["max"] >= text["min"] + 100 + 64  # video (100) and image (64) tokens counted
    problems = "\n".join(report["problems"])
    assert "id='short'" in problems and "two.mp4" in problems and "id='gone'" in problems
    assert "unusable videos (unreadable, empty, too short): 2" in capsys.readouterr().out


def test_paths_outside_the_image_folder_are_problems_unless_allowed(tmp_path, tokenizer_dir, image_folder):
    outside = tmp_path / "outside.png"
    Image.new("RGB", (16, 16), (0, 0, 255)).save(outside)
    data = tmp_path / "escape.json"
    question = qa("<image>\nWhat?")
    samples = [{"id": "up", "image": "../outside.png", "conversations": question},
               {"id": "abs", "image": str(outside), "conversations": question}]  # fmt: skip
    data.write_text(json.dumps(samples))
    code, report = run_check(tmp_path, tokenizer_dir, image_folder, [data])
    assert code == 1 and report["num_structural_errors"] == 2 and report["num_missing_images"] == 0
    assert any("id='up'" in problem and "outside" in problem for problem in report["problems"])
    code, report = run_check(tmp_path, tokenizer_dir, image_folder, [data], "--allow_outside_paths")
    assert code == 0 and report["num_problems"] == 0


def test_invalid_utf8_is_reported_not_raised(tmp_path, tokenizer_dir, image_folder):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(json.dumps({"id": "a", "conversations": qa()}).encode() + b'\n{"id": "b\xe4"}\n')
    code, report = run_check(tmp_path, tokenizer_dir, image_folder, [data])
    assert code == 1 and report["num_structural_errors"] == 1 and report["num_samples"] == 2  # the good line is kept
    assert any("latin1.jsonl" in problem and "line 2: not valid UTF-8" in problem for problem in report["problems"])
    whole = tmp_path / "latin1.json"
    whole.write_bytes(b'[{"id": "b\xe4"}]')
    code, report = run_check(tmp_path, tokenizer_dir, image_folder, [whole])
    assert (
        code == 1
        and report["num_files_unreadable"] == 1
        and "latin1.json: line 1: not valid UTF-8" in report["problems"][0]
    )


def test_length_mix_out_measures_each_sample_for_the_benchmarks(tmp_path, tokenizer_dir, image_folder):
    """A measured mix: every sample's text and supervised tokens as the trainer tokenizes them, drawn by the
    benchmarks in place of the estimated llava665k mix."""
    from llava.bench.length_mix import draw_lengths, known_mix, read_measured_mix

    data = tmp_path / "good.json"
    data.write_text(
        json.dumps([{"id": "a", "image": "ok.png", "conversations": qa()}, {"id": "b", "conversations": qa()}])
    )
    mix = tmp_path / "mix.json"
    code, report = run_check(tmp_path, tokenizer_dir, image_folder, [data], "--length-mix-out", str(mix))
    assert code == 0 and "sample_lengths" not in report  # the JSON report stays small
    measured = read_measured_mix(mix)
    assert [sample.has_visual for sample in measured] == [True, False]
    assert [sample.text_tokens for sample in measured] == [
        report["stats"]["text_tokens"]["max"],
        measured[1].text_tokens,
    ]
    assert sorted(s.text_tokens for s in measured) == [
        report["stats"]["text_tokens"]["min"],
        report["stats"]["text_tokens"]["max"],
    ]
    assert all(0 < sample.answer_tokens < sample.text_tokens for sample in measured)
    drawn = draw_lengths(str(mix), 20, seed=1, visual_tokens=64)
    assert {(s.text_tokens, s.has_visual) for s in drawn} <= {(s.text_tokens, s.has_visual) for s in measured}
    assert known_mix(str(mix)) == str(mix)
    (tmp_path / "other.json").write_text(json.dumps({"samples": [[1, 1, 0]]}))
    with pytest.raises(ValueError, match="not a measured mix"):
        known_mix(str(tmp_path / "other.json"))
