"""bench/perception_compare.py: a tiny real run with two jobs at once, then a rerun that reuses
the data and the finished training runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def compare(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "bench/perception_compare.py", "--out", str(out), "--lidar", "tiny", "--train-seeds", "1-2",
         "--train-frames", "2", "--train-cavs", "2", "--test-runs", "random_traffic:9", "--test-frames", "2",
         "--test-cavs", "2", "--steps", "2", "--rows", "none,late,early", "--jobs", "2", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )


def test_compare_runs_stages_in_parallel_and_reuses_finished_work(tmp_path: Path) -> None:
    out = tmp_path / "compare"
    first = compare(out)
    assert first.returncode == 0, first.stderr[-3000:]
    table = json.loads((out / "table.json").read_text())
    assert list(table["results"]) == ["none", "late", "early"]
    assert table["results"]["early"]["bytes"]["per_message"]["mean"] > table["results"]["late"]["bytes"]["per_message"]["mean"] > 0
    assert {"train_none_s", "train_early_s"} <= set(table["timings_s"])  # late is the none model, not trained
    logs = sorted(p.name for p in (out / "logs").iterdir())
    assert "train_none.txt" in logs and "eval_late.txt" in logs and "generate_test_random_traffic_9.txt" in logs
    assert (out / "runs" / "none" / "done").is_file() and (out / "runs" / "early" / "done").is_file()
    assert "| early |" in (out / "table.md").read_text() and "2 job(s) at once" in (out / "table.md").read_text()

    second = compare(out, "--skip-generate")
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads((out / "table.json").read_text())
    assert not any(key.startswith("train_") and key != "train_wall_s" for key in again["timings_s"])
    for row in ("none", "late", "early"):
        assert again["results"][row]["ap"] == table["results"][row]["ap"]


def test_compare_rejects_bad_arguments(tmp_path: Path) -> None:
    result = compare(tmp_path / "x", "--jobs", "0")
    assert result.returncode == 2 and "--jobs must be >= 1" in result.stderr
    result = compare(tmp_path / "y", "--rows", "none,bogus")
    assert result.returncode == 2 and "unknown rows" in result.stderr
