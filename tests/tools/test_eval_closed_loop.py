"""tools/eval_closed_loop.py: a short real run on a fresh checkpoint, recording, clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from planner_fixtures import untrained_red_light_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "eval_closed_loop.py"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained single-agent policy (the metrics' plumbing does not need a good one)."""
    return untrained_red_light_checkpoint(tmp_path_factory.mktemp("ckpt"))


def test_real_run_writes_json_markdown_and_an_animation(checkpoint, tmp_path):
    out = tmp_path / "eval"
    args = ["--checkpoint", str(checkpoint), "--scenario", "red_light", "--scenario", "left_turn"]
    args += ["--episodes", "1", "--obs", "visible", "--out", str(out), "--record"]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "eval.json").read_text())
    assert set(report["scenarios"]) == {"red_light", "left_turn"} and report["obs"] == "visible"
    assert len(report["episodes"]) == 2
    seeds = [e["seed"] for e in report["episodes"]]
    assert min(seeds) >= 1_000_000_000  # held-out seeds
    overall = report["overall"]
    assert overall["episodes"] == 2.0
    rates = overall["success_rate"] + overall["collision_rate"] + overall["timeout_rate"]
    assert rates == pytest.approx(1.0)
    for key in ("success_rate", "route_completion", "driving_score", "success_weighted_by_time"):
        assert 0.0 <= overall[key] <= 1.0
    assert overall["driving_score"] <= overall["route_completion"] + 1e-9
    assert overall["bytes_per_second"] > 0  # visible: detections on the air
    table = (out / "eval.md").read_text()
    assert "| red_light | 1 |" in table and "| **overall** | 2 |" in table
    assert "| success | success 95% CI | collision |" in table
    assert 0.0 <= overall["success_ci95_low"] <= overall["success_rate"] <= overall["success_ci95_high"] <= 1.0
    gifs = sorted(p.name for p in out.glob("*.gif"))
    assert gifs == ["left_turn_seed1000000000.gif", "red_light_seed1000000000.gif"]
    assert (out / gifs[0]).stat().st_size > 10_000


def test_oracle_observations_send_nothing_and_perception_needs_a_checkpoint(checkpoint, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import eval_closed_loop
    finally:
        sys.path.pop(0)
    out = tmp_path / "oracle"
    assert (
        eval_closed_loop.main(
            ["--checkpoint", str(checkpoint), "--episodes", "1", "--obs", "oracle", "--out", str(out)]
        )
        == 0
    )
    report = json.loads((out / "eval.json").read_text())
    assert report["obs"] == "oracle" and report["overall"]["bytes_per_second"] == 0.0
    capsys.readouterr()
    assert eval_closed_loop.main(["--checkpoint", str(checkpoint), "--obs", "perception"]) == 2
    assert "--obs perception needs --perception-checkpoint RUN" in capsys.readouterr().err
    missing = ["--perception-checkpoint", str(tmp_path / "no_run")]
    assert eval_closed_loop.main(["--checkpoint", str(checkpoint), "--obs", "perception", *missing]) == 2
    assert "no checkpoint.pt and config.yaml" in capsys.readouterr().err
    assert eval_closed_loop.main(["--checkpoint", str(checkpoint), "--obs", "visible", *missing]) == 2
    assert "used only with --obs perception" in capsys.readouterr().err
    # a single-agent policy cannot drive the three-agent merge
    assert (
        eval_closed_loop.main(["--checkpoint", str(checkpoint), "--scenario", "merge", "env.controlled=all"])
        == 2
    )
    assert "trained with 1 agents" in capsys.readouterr().err
    assert eval_closed_loop.main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2


def test_aggregate_gives_mean_and_spread_over_seeds(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import eval_closed_loop
    finally:
        sys.path.pop(0)
    for seed, success in ((0, 0.5), (1, 1.0)):
        folder = tmp_path / f"red_light_visible_s{seed}" / "eval"
        folder.mkdir(parents=True)
        overall = {key: 0.0 for key, _, _ in eval_closed_loop._METRICS} | {
            "episodes": 10.0,
            "success_rate": success,
        }
        (folder / "eval.json").write_text(json.dumps({"overall": overall}))
    assert eval_closed_loop.main(["--aggregate", str(tmp_path)]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| red_light_visible | 2 | 0.75 +- 0.25 |" in summary
    capsys.readouterr()
    with pytest.raises(SystemExit):
        eval_closed_loop.parse_args(["--aggregate", str(tmp_path), "--checkpoint", "x.pt"])


def test_summary_gives_the_wilson_interval_of_the_success_rate():
    """8 successes in 10 episodes: the Wilson score interval worked out by hand."""
    import math

    from models.planning.experiment import EpisodeResult, summarize

    def episode(seed: int, success: bool) -> EpisodeResult:
        agent = {
            "success": float(success), "collision": float(not success), "timeout": 0.0,
            "time_s": 5.0, "reference_time_s": 4.0, "route_completion": 1.0 if success else 0.5,
            "mean_speed": 8.0, "driving_score": 1.0 if success else 0.3,
        }
        return EpisodeResult("red_light", seed, {"cav_0": agent}, 5.0, 0)

    summary = summarize([episode(k, k < 8) for k in range(10)])
    n, p, z = 10, 0.8, 1.959963984540054
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert summary["success_rate"] == pytest.approx(0.8)
    assert summary["success_ci95_low"] == pytest.approx(centre - half, abs=1e-9)  # 0.490
    assert summary["success_ci95_high"] == pytest.approx(centre + half, abs=1e-9)  # 0.943
    everything = summarize([episode(k, True) for k in range(10)])
    assert everything["success_ci95_high"] == pytest.approx(1.0) and everything["success_ci95_low"] < 1.0


def test_conflict_decisions_bench_classifies_episodes_by_the_first_margin(tmp_path):
    """bench/conflict_decisions.py on an untrained red_light policy with conflict features: every
    episode lands in one class, the action shares of each class sum to one, and the first margins
    of red_light's runners are known with visible observations."""
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "plain").mkdir()
    checkpoint = untrained_red_light_checkpoint(tmp_path / "ckpt", "env.conflict_features=true")
    out = tmp_path / "decisions.json"
    result = subprocess.run(
        [sys.executable, "bench/conflict_decisions.py", "--checkpoint", str(checkpoint), "--episodes", "4",
         "--first", "3", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    table = json.loads(out.read_text())["table"]
    assert sum(row["episodes"] for row in table.values()) == 4
    assert set(table) <= {"go first possible", "must yield"}  # the van sees the runner from the start
    for row in table.values():
        assert sum(v for k, v in row.items() if k.startswith("first_")) == pytest.approx(1.0)
        assert {"first_IDLE", "first_FASTER", "first_SLOWER"} <= set(row)
        assert 0.0 <= row["faster_in_first"] <= 3.0
        assert row["success"] + row["collision"] + row["timeout"] == pytest.approx(1.0)
    assert "| first go-first margin | episodes |" in result.stdout
    # without conflict features the script refuses the checkpoint
    plain = untrained_red_light_checkpoint(tmp_path / "plain")
    refused = subprocess.run(
        [sys.executable, "bench/conflict_decisions.py", "--checkpoint", str(plain), "--episodes", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert refused.returncode == 2 and "conflict features" in refused.stderr
