"""tools/eval.py: a short real run on a checkpoint of the tiny config (AP tables, segmentation IoU,
bytes, latency; JSON and markdown), evaluation overrides and errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dataset_fixtures import generate_tiny, load_tool

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "perception" / "tiny.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset root, run folder): 2 training frames, 2 test frames, a one-step tiny run."""
    root = tmp_path_factory.mktemp("eval_data")
    for seed, split in ((1, "train"), (2, "test")):
        generate_tiny(root, seed=seed, split=split)
    threads = torch.get_num_threads()
    runs = root / "runs"
    args = ["--config", str(CONFIG), f"data.root={root}", "train.max_steps=1", "--out", str(runs)]
    assert load_tool("train").main(args) == 0
    torch.set_num_threads(threads)
    return root, runs / "tiny"


def test_eval_writes_metrics(trained, tmp_path):
    root, run = trained
    out = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "eval.py"), "--checkpoint", str(run), "--data", str(root), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fusion"] == "attfuse" and metrics["frames"] == 2 * 3  # ego "all": every cav of 2 frames
    for kind in ("bev", "3d"):
        assert set(metrics["ap"][kind]) == {"0.30", "0.50", "0.70"}
        for row in metrics["ap"][kind].values():
            assert set(row) == {"all", "ego", "others_only"}
            assert row["all"]["num_gt"] == row["ego"]["num_gt"] + row["others_only"]["num_gt"] > 0
            assert all(math.isnan(v["ap"]) or 0.0 <= v["ap"] <= 1.0 for v in row.values())
    seg = metrics["segmentation"]
    assert set(seg["iou"]) == {"free", "vehicle", "road"}
    assert metrics["bytes"]["per_message"]["mean"] > 73  # the header alone is 73 bytes
    assert metrics["bytes"]["per_frame"]["mean"] == pytest.approx(2 * metrics["bytes"]["per_message"]["mean"], rel=0.3)
    assert metrics["latency_ms"]["compute"]["mean"] > 0
    table = (out / "metrics.md").read_text()
    assert "| BEV | 0.70 |" in table and "bytes per message" in table and "segmentation IoU" in table


def test_eval_overrides_change_the_conditions(trained, tmp_path):
    root, run = trained
    evaluate = load_tool("eval")
    threads = torch.get_num_threads()
    args = ["--checkpoint", str(run / "checkpoint.pt"), "--data", str(root / "test"), "--out", str(tmp_path),
            "--max-samples", "2", "link.channel=dsrc", "model.fusion.method=early"]
    assert evaluate.main(args) == 0
    torch.set_num_threads(threads)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["fusion"] == "early" and metrics["frames"] == 2
    assert metrics["bytes"]["per_message"]["mean"] > 1000  # raw points are large
    assert metrics["latency_ms"]["link"]["mean"] > 0  # DSRC airtime


def test_eval_errors(tmp_path, trained):
    root, _ = trained
    evaluate = load_tool("eval")
    assert evaluate.main(["--checkpoint", str(tmp_path), "--data", str(root)]) == 2


def test_eval_refuses_a_method_whose_weights_were_not_trained(trained, tmp_path, capsys):
    root, run = trained
    evaluate = load_tool("eval")
    args = ["--checkpoint", str(run), "--data", str(root), "--out", str(tmp_path), "model.fusion.method=core",
            "model.fusion.compressor.selection=request"]
    assert evaluate.main(args) == 2
    assert "no weights for aggregation" in capsys.readouterr().err


def hidden_confidence(run: Path, root: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "hidden_confidence.py"), "--checkpoint", str(run), "--data", str(root),
         "--every", "1", "--out", str(out), *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )


def test_hidden_confidence_bench_reports_every_map_and_its_budget(trained, tmp_path):
    root, run = trained
    result = hidden_confidence(run, root, tmp_path / "configured")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "configured" / "hidden_confidence.json").read_text())
    assert report["frames"] == 2 * 3 and report["boxes"]["visible"] > 0
    maps = {"ego only", "best sender", "fused, all cells", "fused"}
    for group in ("hidden", "visible"):
        assert set(report["median_at_centres"][group]) == maps
        assert all(math.isnan(v) or 0.0 <= v <= 1.0 for v in report["median_at_centres"][group].values())
    assert all(0.0 <= v <= 1.0 for v in report["background_p999"].values())
    share = report["attention_sender_share_at_hidden"]
    assert share is not None and (math.isnan(share) or 0.0 <= share <= 1.0)  # attfuse: the probe ran
    assert "| fused, all cells |" in result.stdout

    # without a cell budget the configured fused map is the all-cells one, box for box
    unlimited = hidden_confidence(run, root, tmp_path / "unlimited", "model.fusion.compressor.max_cells=0")
    assert unlimited.returncode == 0, unlimited.stderr
    report = json.loads((tmp_path / "unlimited" / "hidden_confidence.json").read_text())
    assert report["median_at_centres"]["visible"]["fused"] == report["median_at_centres"]["visible"]["fused, all cells"]
    assert report["background_p999"]["fused"] == report["background_p999"]["fused, all cells"]

    early = hidden_confidence(run, root, tmp_path / "early", "model.fusion.method=early")
    assert early.returncode == 2 and "intermediate fusion" in early.stderr
