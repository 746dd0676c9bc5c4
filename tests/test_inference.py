"""Inference API and generate CLI on a tiny playground model trained for one step (CPU, ~30 s)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from llava.constants import IMAGE_TOKEN_ID
from llava.data.images import load_and_preprocess
from llava.data.templates import conversation_to_turns
from llava.data.tokenization import tokenize_conversation
from llava.inference import LlavaPipeline, MissingComponentError, build_prompt_ids, left_pad
from llava.playground.builder import build_playground
from llava.tools import generate as generate_cli
from llava.training.train import train
from tests.run_args import finetune_args


@pytest.fixture(scope="module")
def playground(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pg_inference") / "playground"
    build_playground(out, num_pretrain=2, num_finetune=12, seed=0)
    return out


@pytest.fixture(scope="module")
def model_dir(playground: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Output of a real (tiny) finetune run: training's final save must be loadable for inference.

    The learning rate is tiny so the model stays close to its random init and writes long,
    varied answers (a trained tiny model answers EOS at once, which would test nothing).
    """
    out = tmp_path_factory.mktemp("run") / "finetune"
    train(
        finetune_args(
            playground, out, "--per_device_train_batch_size", "1", "--max_steps", "1", "--save_strategy", "no",
            "--learning_rate", "1e-7", "--group_by_modality_length", "False", "--seed", "42",
        )
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def pipeline(model_dir: Path) -> LlavaPipeline:
    return LlavaPipeline.from_pretrained(model_dir, device="cpu")


@pytest.fixture(scope="module")
def images(playground: Path) -> list[str]:
    return [str(path) for path in sorted((playground / "images").glob("*.png"))[:4]]


def _requests(images: list[str]) -> list[dict]:
    return [
        {"image": images[0], "prompt": "Is there a black star in the image?"},
        {"image": None, "prompt": "What is a star?"},
        {"image": [images[1], images[2]], "prompt": "What differs between the two pictures? Describe both in detail."},
        {"image": images[3], "prompt": "<image>\nWhat colour is the shape?"},
        {"image": images[0], "prompt": "Describe"},
    ]


def test_left_pad_is_left_aligned() -> None:
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_prompt_matches_training_prefix(pipeline: LlavaPipeline, playground: Path) -> None:
    """Inference builds the prompt with the training builder: it is a prefix of a training sample."""
    conversation = [
        {"from": "human", "value": "<image>\nIs there a red circle?"},
        {"from": "gpt", "value": "Yes"},
    ]
    trained = tokenize_conversation(
        pipeline.tokenizer, pipeline.template, conversation_to_turns(pipeline.template, conversation)
    )["input_ids"]
    prompt = build_prompt_ids(pipeline.tokenizer, pipeline.template, "Is there a red circle?", 1, IMAGE_TOKEN_ID)
    assert trained[: len(prompt)] == prompt
    assert prompt.count(IMAGE_TOKEN_ID) == 1
    assert prompt[0] == pipeline.tokenizer.bos_token_id


def test_answers_do_not_depend_on_batch_size(pipeline: LlavaPipeline, images: list[str]) -> None:
    """LLaVA #1928: padding must not change answers (left padding + merged mask/positions)."""
    requests = _requests(images)
    by_batch_size = {bs: pipeline.generate(requests, max_new_tokens=8, batch_size=bs) for bs in (1, 2, 5)}
    assert by_batch_size[1] == by_batch_size[2] == by_batch_size[5]
    assert len(by_batch_size[1]) == len(requests)
    assert sum(bool(answer) for answer in by_batch_size[1]) >= 3  # the comparison is not vacuous


def test_multiple_images_stacked_in_sentinel_order(pipeline: LlavaPipeline, images: list[str]) -> None:
    requests = [
        {"image": [images[1], images[2]], "prompt": "Compare."},
        {"image": None, "prompt": "Hello"},
        {"image": images[0], "prompt": "Describe."},
    ]
    prepared = pipeline.prepare(requests)
    input_ids, attention_mask, pixel_values = (prepared[k] for k in ("input_ids", "attention_mask", "pixel_values"))
    assert (input_ids == IMAGE_TOKEN_ID).sum(dim=1).tolist() == [2, 0, 1]
    expected = load_and_preprocess([images[1], images[2], images[0]], pipeline.image_processor)
    torch.testing.assert_close(pixel_values, expected)
    assert attention_mask[:, -1].all()  # left padded: every row ends with a real token
    (answer,) = pipeline.generate(requests[:1], max_new_tokens=4)
    assert isinstance(answer, str)


def test_text_only_request(pipeline: LlavaPipeline) -> None:
    prepared = pipeline.prepare([{"image": None, "prompt": "What is a circle?"}])
    input_ids, pixel_values = prepared["input_ids"], prepared.get("pixel_values")
    assert pixel_values is None
    assert not (input_ids == IMAGE_TOKEN_ID).any()
    answers = pipeline.generate([{"prompt": "What is a circle?"}, {"image": None, "prompt": "Hi"}], max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)


def test_tag_count_must_match_images(pipeline: LlavaPipeline, images: list[str]) -> None:
    with pytest.raises(ValueError, match="2 images"):
        pipeline.prepare([{"image": images[:2], "prompt": "<image>\nOnly one tag"}])


def test_missing_components_are_named(model_dir: Path, tmp_path: Path) -> None:
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(model_dir, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    with pytest.raises(MissingComponentError, match="no tokenizer"):
        LlavaPipeline.from_pretrained(no_tokenizer)

    no_processor = tmp_path / "no_processor"
    shutil.copytree(model_dir, no_processor)
    (no_processor / "preprocessor_config.json").unlink()
    with pytest.raises(MissingComponentError, match="image processor"):
        LlavaPipeline.from_pretrained(no_processor)

    adapter_only = tmp_path / "adapter_only"
    adapter_only.mkdir()
    (adapter_only / "adapter_config.json").write_text("{}")
    with pytest.raises(MissingComponentError, match="merge_lora"):
        LlavaPipeline.from_pretrained(adapter_only)


def test_cli_writes_one_answer_per_request(
    model_dir: Path, pipeline: LlavaPipeline, images: list[str], tmp_path: Path
) -> None:
    requests_file = tmp_path / "requests.jsonl"
    records = [
        {"id": "a", "image": images[0], "prompt": "Is there a black star in the image?"},
        {"id": "b", "image": None, "prompt": "What is a star?"},
        {"id": "c", "image": [Path(images[1]).name, Path(images[2]).name], "prompt": "Compare."},
    ]
    requests_file.write_text("".join(json.dumps(record) + "\n" for record in records))
    out = tmp_path / "answers.jsonl"
    folder = str(Path(images[0]).parent)
    argv = ["--model", str(model_dir), "--requests", str(requests_file), "--image-folder", folder]
    rc = generate_cli.main([*argv, "--out", str(out), "--batch-size", "2", "--max-new-tokens", "6"])
    assert rc == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [answer["id"] for answer in answers] == ["a", "b", "c"]
    expected = pipeline.generate([{"image": r["image"], "prompt": r["prompt"]} for r in answers], max_new_tokens=6)
    assert [answer["answer"] for answer in answers] == expected


def test_cli_pairs_print_answers(model_dir: Path, images: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", str(model_dir), "--image", images[0], "--prompt", "Describe.", "--image", "none"]
    rc = generate_cli.main([*argv, "--prompt", "Hi", "--max-new-tokens", "3"])
    assert rc == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split("]")[0] for line in printed] == ["[0", "[1"]
    # The fast decode path (static caches; no CUDA graph on CPU) prints the same answers.
    assert generate_cli.main([*argv, "--prompt", "Hi", "--max-new-tokens", "3", "--fast-decoding"]) == 0
    assert capsys.readouterr().out.splitlines() == printed


def test_requests_file_with_invalid_utf8_names_the_line(model_dir: Path, tmp_path: Path, capsys) -> None:
    requests_file = tmp_path / "requests.jsonl"
    good = json.dumps({"id": "q-1", "prompt": "What?"}).encode()
    requests_file.write_bytes(good + b"\n" + good.replace(b"What", b"Wh\xe4t") + b"\n")
    assert generate_cli.main(["--model", str(model_dir), "--requests", str(requests_file)]) == 2
    assert "requests.jsonl:2: not valid UTF-8" in capsys.readouterr().err


def test_malformed_config_and_truncated_weights_name_the_file(model_dir: Path, tmp_path: Path) -> None:
    from llava.model.loading import load_pretrained_model

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    config = broken / "config.json"
    good_config = config.read_text()
    config.write_text(good_config[:-20])
    with pytest.raises(ValueError, match=r"broken/config\.json: malformed JSON at line"):
        load_pretrained_model(broken)
    config.write_text(good_config)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])
    with pytest.raises(ValueError, match=r"broken/model\.safetensors: unreadable safetensors file"):
        load_pretrained_model(broken)


def test_requests_are_validated_before_the_model_loads(
    model_dir: Path, images: list[str], tmp_path: Path, capsys, monkeypatch
) -> None:
    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded for invalid requests")

    monkeypatch.setattr(generate_cli, "load_pipeline", no_model)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    cases = [
        ({"id": "q-2", "image": [images[0], 7], "prompt": "What?"}, "'image'[1] must be a path, got int"),
        ({"id": "q-2", "image": str(empty), "prompt": "What?"}, "image file is empty"),
        ({"id": "q-2", "image": str(broken), "prompt": "What?"}, "cannot read image"),
    ]
    for request, message in cases:
        requests_file = tmp_path / "requests.jsonl"
        requests_file.write_text(json.dumps({"id": "q-1", "prompt": "Hi"}) + "\n" + json.dumps(request) + "\n")
        assert generate_cli.main(["--model", str(model_dir), "--requests", str(requests_file)]) == 2
        err = capsys.readouterr().err
        assert "requests.jsonl:2: request id='q-2'" in err and message in err, err


def test_a_request_failing_at_generation_costs_only_its_own_answer(
    model_dir: Path, images: list[str], tmp_path: Path, capsys
) -> None:
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not a video, and this image-only model has no video tower anyway")
    requests_file = tmp_path / "requests.jsonl"
    rows = [{"id": "good-1", "image": images[0], "prompt": "What?"},
            {"id": "bad", "video": str(video), "prompt": "What happens?"},
            {"id": "good-2", "prompt": "Hello"}]  # fmt: skip
    requests_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "answers.jsonl"
    argv = ["--model", str(model_dir), "--requests", str(requests_file), "--out", str(out), "--max-new-tokens", "3",
            "--allow-outside-paths"]  # fmt: skip
    assert generate_cli.main(argv) == 2
    written = {row["id"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert isinstance(written["good-1"]["answer"], str) and isinstance(written["good-2"]["answer"], str)
    assert written["bad"]["answer"] is None and "video" in written["bad"]["error"]
    err = capsys.readouterr().err
    assert "requests.jsonl:2: request id='bad'" in err and "1 of 3 requests failed" in err


def test_requests_may_not_name_files_outside_their_folder(model_dir: Path, images: list[str], tmp_path: Path, capsys):
    requests_file = tmp_path / "requests.jsonl"
    requests_file.write_text(json.dumps({"id": "q-9", "image": images[0], "prompt": "What?"}) + "\n")
    assert generate_cli.main(["--model", str(model_dir), "--requests", str(requests_file)]) == 2
    err = capsys.readouterr().err
    assert "requests.jsonl:1: request id='q-9'" in err and "outside" in err and "--allow-outside-paths" not in err
    [request] = generate_cli.read_requests(requests_file, allow_outside_paths=True)
    assert request["image"] == [images[0]]
    [request] = generate_cli.read_requests(requests_file, image_folder=Path(images[0]).parent)  # inside: fine
    assert Path(request["image"][0]).resolve() == Path(images[0]).resolve()


def test_cli_missing_image_names_file_and_id(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requests_file = tmp_path / "requests.jsonl"
    requests_file.write_text(json.dumps({"id": "q-17", "image": "nope/missing.png", "prompt": "What?"}) + "\n")
    rc = generate_cli.main(["--model", str(model_dir), "--requests", str(requests_file)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "q-17" in err and "missing.png" in err
