"""tools/train.py: short real runs on the tiny config (resolved config, checkpoints, tensorboard,
resume, determinism, configuration errors)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dataset_fixtures import generate_tiny, load_tool

from models.experiment import load_experiment

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "train.py"
CONFIG = ROOT / "configs" / "perception" / "tiny.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_tiny(tmp_path_factory.mktemp("train_data"), seed=1)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the tool sets it from the config


def overrides(data: Path, name: str, steps: int) -> list[str]:
    return [f"data.root={data}", f"name={name}", f"train.max_steps={steps}", "train.checkpoint_every=1", "data.cache_frames=0"]


def test_train_run_resume_and_determinism(data, tmp_path):
    out = tmp_path / "runs"
    # the real script, in its own process
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", str(CONFIG), *overrides(data, "a", 2), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    run = out / "a"
    saved = load_experiment(run / "config.yaml")
    assert saved == load_experiment(CONFIG, overrides(data, "a", 2))
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2 and state["config"]["model"]["fusion"]["method"] == "attfuse"
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert "samples_per_s" in result.stderr  # the progress bar shows loss and throughput

    train = load_tool("train")
    # same seed, same weights
    assert train.main(["--config", str(CONFIG), *overrides(data, "b", 2), "--out", str(out)]) == 0
    other = torch.load(out / "b" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(state["model"][k], other[k]) for k in state["model"])

    # an existing run is not overwritten; --resume continues it to more steps
    assert train.main(["--config", str(CONFIG), *overrides(data, "a", 3), "--out", str(out)]) == 2
    assert train.main(["--config", str(CONFIG), *overrides(data, "a", 3), "--out", str(out), "--resume"]) == 0
    resumed = torch.load(run / "checkpoint.pt", weights_only=False)
    assert resumed["step"] == 3
    assert not all(torch.equal(resumed["model"][k], state["model"][k]) for k in state["model"])
    # ... but only with the same settings
    changed = [*overrides(data, "a", 4), "train.lr=0.01"]
    assert train.main(["--config", str(CONFIG), *changed, "--out", str(out), "--resume"]) == 2


def test_configuration_errors_are_reported(tmp_path, capsys):
    train = load_tool("train")
    assert train.main(["--config", str(CONFIG), "train.learning_rate=0.1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "train.learning_rate" in err and "valid keys" in err and "lr" in err
    assert train.main(["--config", str(CONFIG), "model.fusion.method=telepathy", "--out", str(tmp_path)]) == 2
    assert train.main(["--config", str(CONFIG), "name=x", "--out", str(tmp_path), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
