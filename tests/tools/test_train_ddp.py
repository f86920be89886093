"""tools/train.py under torchrun (DDP, gloo on CPU): two processes train the model one process trains
with the same global batch, process 0 alone writes and logs, --resume continues at the right step,
and a batch that does not split over the processes is refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dataset_fixtures import generate_tiny, load_tool

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "train.py"
CONFIG = ROOT / "configs" / "perception" / "tiny.yaml"
# Largest parameter difference allowed after 3 AdamW steps (measured: about 1e-5, against 6e-3
# without batch-norm synchronisation). The forward pass is bit for bit the single process's; the
# backward pass sums in another order (last-bit differences), and Adam's first steps turn a
# last-bit difference in a gradient near zero into a step difference of a fraction of lr.
TOLERANCE = 5e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 samples (2 frames x 3 egos): with batch 4, an epoch is a batch of 4 and one of 2."""
    return generate_tiny(tmp_path_factory.mktemp("train_ddp_data"), seed=1)


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the tool sets it from the config


def overrides(data: Path, name: str, steps: int, batch_size: int = 4) -> list[str]:
    return [
        f"data.root={data}",
        f"name={name}",
        f"train.max_steps={steps}",
        f"train.batch_size={batch_size}",
        "train.checkpoint_every=1",
        "data.cache_frames=0",
    ]


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """The real launcher: ``torchrun --standalone --nproc_per_node N tools/train.py ...``."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(SCRIPT),
        *args,
    ]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def assert_same_model(one: dict, two: dict) -> None:
    assert one.keys() == two.keys()
    for key, value in one.items():
        if value.is_floating_point():
            difference = (value - two[key]).abs().max().item()
            assert difference <= TOLERANCE, f"{key}: {difference:.2e}"
        else:  # batch counts of the batch norms
            assert torch.equal(value, two[key]), key


def test_two_processes_train_the_single_process_model_and_resume(data, tmp_path):
    out = tmp_path / "runs"
    train = load_tool("train")
    args = ["--config", str(CONFIG), "--out", str(out)]
    # global batch 4: one process takes it whole, two take 2 + 2 (then 1 + 1 at the epoch's end)
    assert train.main([*args, *overrides(data, "one", 2)]) == 0
    result = torchrun([*args, *overrides(data, "two", 2)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done:") == 1 and "x 2 processes" in result.stdout  # process 0 alone prints
    assert "steps/s" in result.stdout
    run = out / "two"
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1  # process 0 alone logs
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.yaml", "tb"]
    one = torch.load(out / "one" / "checkpoint.pt", weights_only=False)
    two = torch.load(run / "checkpoint.pt", weights_only=False)
    assert (two["step"], two["epoch"], two["batch_in_epoch"]) == (
        one["step"],
        one["epoch"],
        one["batch_in_epoch"],
    )
    assert_same_model(one["model"], two["model"])

    # --resume under torchrun: every process continues at global step 2, the start of epoch 1
    assert train.main([*args, *overrides(data, "one", 3), "--resume"]) == 0
    result = torchrun([*args, *overrides(data, "two", 3), "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("resuming") == 1 and "at step 2 (epoch 1, batch 0)" in result.stdout
    one_resumed = torch.load(out / "one" / "checkpoint.pt", weights_only=False)
    two_resumed = torch.load(run / "checkpoint.pt", weights_only=False)
    assert (two_resumed["step"], two_resumed["epoch"], two_resumed["batch_in_epoch"]) == (3, 1, 1)
    assert one_resumed["optimizer"]["state"][0]["step"] == two_resumed["optimizer"]["state"][0]["step"] == 3
    assert_same_model(one_resumed["model"], two_resumed["model"])
    # the tolerance is small against what one step moves
    moved = max(
        (one_resumed["model"][k] - one["model"][k]).abs().max().item()
        for k in one["model"]
        if one["model"][k].is_floating_point()
    )
    assert moved > 20 * TOLERANCE


def test_a_batch_that_does_not_split_is_refused(data, tmp_path):
    out = tmp_path / "runs"
    result = torchrun(["--config", str(CONFIG), "--out", str(out), *overrides(data, "odd", 2, batch_size=3)])
    assert result.returncode != 0
    assert "train.batch_size 3 is the global batch: it must be divisible by the 2 processes" in result.stderr
    assert not (out / "odd").exists()
