"""plot_curves: several runs, missing metrics, duplicated steps after resume, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llava.tools.plot_curves import MetricsFileError, load_metrics, main, metric_series


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    run_a = write_jsonl(
        tmp_path / "run_a" / "metrics.jsonl",
        [{"step": s, "loss": 2.0 / s, "learning_rate": 1e-3, "tokens_per_s": 100.0} for s in (1, 2, 3)]
        # resumed from step 2: step 3 logged again, then step 4
        + [{"step": 3, "loss": 0.5, "learning_rate": 1e-3}, {"step": 4, "loss": 0.4}]
        + [{"step": 4, "train_runtime": 12.0}],
    )
    run_b = write_jsonl(tmp_path / "run_b" / "metrics.jsonl", [{"step": s, "loss": 1.0} for s in (1, 2)])
    return run_a, run_b


def test_duplicated_steps_keep_the_last_value(two_runs: tuple[Path, Path]) -> None:
    rows = load_metrics(two_runs[0])
    assert metric_series(rows, "loss") == ([1, 2, 3, 4], [2.0, 1.0, 0.5, 0.4])
    assert metric_series(rows, "tokens_per_s") == ([1, 2, 3], [100.0] * 3)
    assert metric_series(rows, "missing") == ([], [])


def test_cli_writes_png_with_missing_metric(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "plots" / "curves.png"
    status = main([*map(str, two_runs), "--labels", "a", "b", "--metrics", "loss,tokens_per_s,nope", "--out", str(out)])
    assert status == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_module_entry_point(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "c.png"
    cmd = [sys.executable, "-m", "llava.tools.plot_curves", *map(str, two_runs), "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    assert out.is_file()


def test_missing_and_empty_files_are_clear_errors(tmp_path: Path, caplog) -> None:
    with pytest.raises(MetricsFileError, match="not found"):
        load_metrics(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(MetricsFileError, match="empty"):
        load_metrics(empty)
    assert main([str(empty), "--out", str(tmp_path / "x.png")]) == 2
    assert "empty" in caplog.text
    assert not (tmp_path / "x.png").exists()


def test_label_count_must_match(two_runs: tuple[Path, Path]) -> None:
    with pytest.raises(SystemExit):
        main([*map(str, two_runs), "--labels", "only-one"])
