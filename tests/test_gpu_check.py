"""scripts/gpu/check.sh in its SMOKE mode (tiny shapes on the CPU, every part in one process) writes a summary with
every claim and a number for each; scripts/gpu/prepare_wheels.sh's dry run names the tested pins and the pip
command for a Python 3.12 x86_64 box, and downloads nothing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / "scripts" / "gpu" / "check.sh"
PREPARE = REPO / "scripts" / "gpu" / "prepare_wheels.sh"
DUET = ("duet_192", "duet_128", "duet_64")
SMOKE_BIG_BATCH = 2
PARTS = (
    "cuda_tests",
    "image_infer",
    "train",
    "train_ragged",
    "video_infer",
    "qwen_infer",
    "dymu_infer",
    "selector_infer",
)


def table_rows(markdown: str) -> list[list[str]]:
    """Cells of every Markdown table row (header and separator rows included)."""
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in markdown.splitlines()
        if line.startswith("|")
    ]


def pinned_versions() -> dict[str, str]:
    """Normalized name -> version of constraints/tested.txt."""
    pins = {}
    for line in (REPO / "constraints" / "tested.txt").read_text().splitlines():
        match = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", line)
        if match:
            pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return pins


def run_script(script: Path, tmp_path: Path, timeout: float, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(
        ["bash", str(script)], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=timeout
    )


def test_smoke_check_lists_every_claim_with_a_number(tmp_path):
    out = tmp_path / "gpu-check"
    done = run_script(CHECK, tmp_path, 120, SMOKE="1", OUT_DIR=str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# GPU check (SMOKE")
    claims = {row[0]: row for row in table_rows(summary) if len(row) == 5 and row[0] not in ("claim", "---")}
    big = SMOKE_BIG_BATCH
    expected = {"decode_none_b1", f"decode_none_b{big}", f"prefill_duet_64_b{big}", "graphs", "cuda_tests"}
    expected |= {f"{kind}_{preset}_b{batch}" for kind in ("ttft", "decode") for preset in DUET for batch in (1, big)}
    expected |= {f"train_{preset}" for preset in DUET} | {"train_packed_none", "train_packed_duet_128"}
    assert set(claims) == expected, summary
    for key, (_, _, status, measured, target) in claims.items():
        assert status.split()[0] in ("PASS", "FAIL", "SKIPPED"), (key, status)
        assert re.search(r"\d", measured) and re.search(r"\d", target), (key, measured, target)
    info = [row for row in table_rows(summary) if len(row) == 3 and row[0] not in ("part", "---")]
    for part in ("video_infer", "qwen_infer", "dymu_infer", "selector_infer"):
        measured = [row[2] for row in info if row[0] == part]
        assert len(measured) >= 4 and all(re.search(r"TTFT \d.* decode \d", text) for text in measured), part
    selectors = {row[1].split()[0] for row in info if row[0] == "selector_infer"}
    assert selectors == {"none", "visionzip_64", "divprune_64", "vispruner_64", "cdpruner_64"}, selectors
    timings = (out / "timings.tsv").read_text().splitlines()
    statuses = {line.split("\t")[0]: line.split("\t")[1] for line in timings[1:]}
    assert all(statuses.get(part) == "ok" for part in ("install", *PARTS, "summary")), statuses
    assert "pip install --no-deps --no-index" in (out / "logs" / "install.log").read_text()  # printed, not run


def dry_run(tmp_path: Path, **env: str) -> tuple[list[str], str]:
    wheels = tmp_path / "wheels"
    done = run_script(PREPARE, tmp_path, 30, DRY_RUN="1", WHEEL_DIR=str(wheels), **env)
    assert done.returncode == 0, done.stderr
    assert not wheels.exists()  # nothing downloaded
    listed = re.search(r"^packages \(\d+\): (.*)$", done.stdout, re.MULTILINE)
    command = re.search(r"^\+ (.*)$", done.stdout, re.MULTILINE)
    assert listed and command, done.stdout
    return listed.group(1).split(), command.group(1)


def test_prepare_wheels_dry_run_pins_the_tested_versions_for_the_gpu_box(tmp_path):
    specs, command = dry_run(tmp_path)
    pins = pinned_versions()
    pinned = {}
    for spec in specs:
        if spec.startswith("setuptools"):
            assert spec == "setuptools>=68,<85"  # pyproject's build-system range (not in the tested set)
            continue
        name, version = spec.split("==")
        pinned[re.sub(r"[-_.]+", "-", name).lower()] = version
        assert pins[re.sub(r"[-_.]+", "-", name).lower()] == version, spec
    assert {"accelerate", "peft", "pillow", "psutil", "pytest", "safetensors", "tokenizers"} <= set(pinned)
    assert "torch" not in pinned and "transformers" not in pinned  # preinstalled on the box
    for option in ("--no-deps", "--only-binary=:all:", "--python-version 3.12", "--abi cp312",
                   "--platform manylinux2014_x86_64", "--platform manylinux_2_17_x86_64", "pip download"):  # fmt: skip
        assert option in command, option
    with_torch, _ = dry_run(tmp_path, INCLUDE_TORCH="1", EXTRA="numpy")
    assert {f"torch=={pins['torch']}", f"transformers=={pins['transformers']}", f"numpy=={pins['numpy']}"} <= set(
        with_torch
    )


def test_prepare_wheels_refuses_a_package_without_a_tested_pin(tmp_path):
    done = run_script(PREPARE, tmp_path, 30, DRY_RUN="1", EXTRA="not-a-pinned-package")
    assert done.returncode == 1 and "not-a-pinned-package is not pinned" in done.stderr


def test_gpu_scripts_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install -e '.[dev]')")
    subprocess.run([shellcheck, "-x", str(CHECK), str(PREPARE)], check=True, cwd=REPO)
