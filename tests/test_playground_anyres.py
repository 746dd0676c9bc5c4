"""The AnyRes playground (``PIPELINE=anyres``): a tiny LLaVA-NeXT checkpoint whose tile grid follows the image's
aspect ratio, finetuned with and without an AnyRes DUET preset through the real scripts and tabled by
``llava.eval.compare`` (a reduced run: random tower and LLM, one step each, a few questions)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from llava.families.registry import family_for
from llava.playground.anyres import PATCH, VIEW
from llava.playground.scenes import random_scene
from llava.playground.tiny_models import build_tiny_vision_tower
from llava.playground.tower_training import pretrain_tower, scene_batch
from llava.tools import make_playground

REPO = Path(__file__).resolve().parents[1]
LIMIT_S = 300
TRAIN_PRESET = "anyres_duet_third"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def anyres_playground(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("anyres") / "playground"
    args = ["--task", "anyres", "--out", str(out), "--num-pretrain", "3", "--num-finetune", "16", "--num-eval", "18",
            "--tower-steps", "0", "--llm-steps", "0", "--vocab-size", "400"]  # fmt: skip
    assert make_playground.main(args) == 0
    return out


def test_tower_pretraining_at_the_view_size_labels_its_own_patch_grid() -> None:
    scenes = [random_scene(random.Random(0), f"s{i}.png") for i in range(2)]
    pixels, targets = scene_batch(scenes, PATCH, VIEW)
    assert pixels.shape == (2, 3, VIEW, VIEW) and targets["patch_color"].shape == (2, (VIEW // PATCH) ** 2)
    with pytest.raises(ValueError, match="must divide"):
        scene_batch(scenes, PATCH, 100)
    result = pretrain_tower(build_tiny_vision_tower(0, image_size=VIEW), steps=2, batch_size=2, progress=False)
    assert result.steps == 2 and 0.0 <= result.patch_color_accuracy <= 1.0


def test_builder_writes_a_llava_next_checkpoint_whose_tiles_follow_the_aspect_ratio(anyres_playground: Path) -> None:
    manifest = json.loads((anyres_playground / "manifest.json").read_text())
    assert manifest["task"] == "anyres" and manifest["benchmark"]["questions"] == 18
    assert family_for(anyres_playground / "model").name == "llava_next"
    # base view (64) + the tile grid's patches + one newline per tile row: 1 x 2, 2 x 1 and 2 x 2 tiles
    assert manifest["anyres"]["tokens_per_image"] == {"wide": 64 + 128 + 8, "tall": 64 + 128 + 16, "square": 336}
    sizes = {Image.open(path).size for path in (anyres_playground / "eval" / "playground" / "images").iterdir()}
    assert sizes == {(224, 112), (112, 224), (224, 224)}
    samples = json.loads((anyres_playground / "finetune.json").read_text())
    assert len(samples) == 16 and samples[0]["conversations"][0]["value"].startswith("<image>\n")


def test_anyres_pipeline_trains_with_and_without_compression_and_tables_both(
    anyres_playground: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(
        PIPELINE="anyres", PLAYGROUND_DIR=str(anyres_playground), RUNS_DIR=str(runs), PYTHON=sys.executable,
        MAX_STEPS="1", EVAL_PRESETS=f"none,{TRAIN_PRESET}", TRAIN_COMPRESSION=TRAIN_PRESET, REPORT_TO="none",
        DS_ACCELERATOR="cpu", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", NUM_WORKERS="0",
        MODEL_FAMILY="llava_next", PROJECTOR_STAGE="0",  # no family lookups, no projector stage: under a minute
    )  # fmt: skip
    process = subprocess.Popen(
        ["bash", str(REPO / "scripts" / "playground" / "run.sh")],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"run.sh did not finish in {LIMIT_S} s:\n{output[-6000:]}")
    assert process.returncode == 0, output[-6000:]

    table = json.loads((runs / "eval" / "table.json").read_text())
    rows = {(row["checkpoint"], row["preset"]): row for row in table["rows"]}
    trained = f"trained_{TRAIN_PRESET}"
    assert set(rows) == {("none", "none"), ("none", TRAIN_PRESET), (trained, TRAIN_PRESET)}
    assert table["baseline"] == ["none", "none"]
    full = rows["none", "none"]["visual_tokens_per_layer"]
    assert 200 <= full <= 336  # every question's image: 200, 208 or 336 tokens in every layer
    for key in (("none", TRAIN_PRESET), (trained, TRAIN_PRESET)):
        assert 0.25 < rows[key]["visual_tokens_per_layer"] / full < 0.45  # about a third
    for row in rows.values():
        assert 0.0 <= row["cells"]["playground"]["score"] <= 100.0 and row["train_s"] > 0
    assert rows[trained, TRAIN_PRESET]["train_saved_percent"] is not None
    for name in ("table.md", "table.png"):
        assert (runs / "eval" / name).is_file()
    assert (runs / "curves.png").is_file()
    for run in ("none", TRAIN_PRESET):
        assert (runs / run / "finetune" / "config.json").is_file()
