"""tools/train_planner.py: a short real run, resume, and clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from models.config import load_config
from models.planning.experiment import PlannerConfig, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "train_planner.py"
TINY = [
    "env.episode_s=2.0",
    "env.k_nearest=4",
    "learner.num_envs=2",
    "learner.rollout_steps=10",
    "learner.network.hidden_sizes=16",
    "learner.ppo.epochs=1",
    "run.checkpoint_every=1",
]


def run_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_short_run_then_resume(tmp_path):
    out = tmp_path / "run"
    config = ROOT / "configs" / "planner" / "merge_pis.yaml"
    first = run_train("--config", str(config), "--out", str(out), *TINY, "learner.total_steps=40")
    assert first.returncode == 0, first.stderr
    assert (out / "checkpoint.pt").is_file() and list((out / "tb").iterdir())
    resolved = load_config(PlannerConfig, out / "config.yaml")
    assert resolved.env.intent and resolved.env.safety and resolved.learner.num_envs == 2
    assert resolved.run.out_dir == str(out)
    lines = [json.loads(x) for x in (out / "progress.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [1, 2] and lines[-1]["env_steps"] == 40
    assert all(k in lines[-1] for k in ("ppo_policy_loss", "ppo_value_loss", "ppo_entropy"))
    state, saved = load_checkpoint(out / "checkpoint.pt")
    assert state["trainer"]["iteration"] == 2 and saved == resolved

    # train on: only learner.total_steps changes
    second = run_train(
        "--config", str(config), "--out", str(out), *TINY, "learner.total_steps=60", "--resume"
    )
    assert second.returncode == 0, second.stderr
    assert "resuming" in second.stdout
    lines = [json.loads(x) for x in (out / "progress.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [1, 2, 3] and lines[-1]["env_steps"] == 60
    state, _ = load_checkpoint(out / "checkpoint.pt")
    assert state["trainer"]["iteration"] == 3
    assert yaml.safe_load((out / "config.yaml").read_text())["learner"]["total_steps"] == 60


def test_errors_are_clear(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import train_planner
    finally:
        sys.path.pop(0)
    out = tmp_path / "run"
    assert train_planner.main(["--out", str(out), "env.scenari=merge"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'env.scenari'" in err and "'scenario'" in err
    assert train_planner.main(["--out", str(out), "env.obs=perception"]) == 2
    assert "env.obs=perception is for evaluation, not training" in capsys.readouterr().err
    assert train_planner.main(["--out", str(out), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    # a run is never continued with other settings, nor overwritten
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"")
    assert train_planner.main(["--out", str(out)]) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_time_limit_curriculum_anneals_to_the_tasks_limit(tmp_path):
    out = tmp_path / "curriculum"
    config = ROOT / "configs" / "planner" / "red_light.yaml"
    done = run_train(
        "--config",
        str(config),
        "--out",
        str(out),
        *TINY[1:],  # the scenario's own time limit
        "learner.total_steps=60",
        "curriculum.time_limit_scale=1.5",
        "curriculum.anneal_steps=40",
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(x) for x in (out / "progress.jsonl").read_text().splitlines()]
    assert [x["time_limit_scale"] for x in lines] == [1.5, 1.25, 1.0]
    bad = run_train("--out", str(tmp_path / "bad"), "curriculum.time_limit_scale=0.5")
    assert bad.returncode == 2 and "time_limit_scale must be >= 1" in bad.stderr
    short = run_train(
        "--out", str(tmp_path / "short"), "learner.total_steps=100", "curriculum.anneal_steps=200"
    )
    assert short.returncode == 2 and "training would end before" in short.stderr
