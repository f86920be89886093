"""tools/generate.py: real short runs on every scenario, determinism, resume, clear errors."""

import subprocess
import sys
from pathlib import Path

import pytest

from datasets.native import list_cavs, list_frames, read_agent_frame, read_manifest
from sim.scenarios import SCENARIOS

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "generate.py"


def run_generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_scenario_generates_frames(tmp_path, scenario):
    out = run_generate(
        "--scenario", scenario, "--frames", "2", "--seed", "1", "--out", str(tmp_path), "--lidar", "tiny"
    )
    assert out.returncode == 0, out.stderr
    run = tmp_path / "train" / f"{scenario}_s000001"
    cavs = list_cavs(run)
    assert len(cavs) >= 2
    assert list_frames(run, cavs) == [0, 1]
    manifest = read_manifest(run)
    assert manifest.scenario == scenario and manifest.counts.frames_written == 2
    frame = read_agent_frame(run / str(cavs[0]) / "000001.yaml")
    assert len(frame.points) > 100 and len(frame.boxes_world) > 0


def test_same_seed_same_bytes_and_resume_after_interruption(tmp_path):
    args = ["--scenario", "red_light", "--frames", "4", "--seed", "7", "--lidar", "tiny"]
    assert run_generate(*args, "--out", str(tmp_path / "a")).returncode == 0
    assert run_generate(*args, "--out", str(tmp_path / "b")).returncode == 0
    a, b = tree_bytes(tmp_path / "a"), tree_bytes(tmp_path / "b")
    assert a.keys() == b.keys()
    differing = [k for k in a if a[k] != b[k] and not k.endswith("manifest.yaml")]
    assert differing == []

    # an interruption after frame 1: frames 2 and 3 lost, a stray temporary file left behind
    run = tmp_path / "b" / "train" / "red_light_s000007"
    for cav in list_cavs(run):
        for frame in (2, 3):
            for suffix in (".yaml", ".pcd", ".npz"):
                (run / str(cav) / f"{frame:06d}{suffix}").unlink()
    assert list_frames(run) == [0, 1]
    out = run_generate(*args, "--out", str(tmp_path / "b"))
    assert out.returncode == 0, out.stderr
    assert "resuming" in out.stdout
    assert tree_bytes(tmp_path / "b").keys() == a.keys()
    resumed = tree_bytes(tmp_path / "b")
    assert [k for k in a if a[k] != resumed[k] and not k.endswith("manifest.yaml")] == []
    assert (
        read_manifest(run).counts.to_dict()
        == read_manifest(tmp_path / "a" / "train" / "red_light_s000007").counts.to_dict()
    )


def test_bad_arguments_give_clear_errors(tmp_path):
    out = run_generate("--scenario", "roundabout", "--frames", "1", "--out", str(tmp_path))
    assert out.returncode != 0 and "valid scenarios" in out.stderr and "left_turn" in out.stderr
    out = run_generate("--scenario", "merge", "--frames", "1", "--out", str(tmp_path), "--lidar", "hdl65")
    assert out.returncode != 0 and "hdl64" in out.stderr
    out = run_generate("--scenario", "merge", "--frames", "0", "--out", str(tmp_path))
    assert out.returncode != 0 and "--frames" in out.stderr
    out = run_generate(
        "--scenario", "merge", "--frames", "1", "--out", str(tmp_path), "--traffic-density", "-2"
    )
    assert out.returncode == 2 and "traffic_density" in out.stderr
    # a run is never continued with other settings
    ok = run_generate("--scenario", "merge", "--frames", "1", "--out", str(tmp_path), "--lidar", "tiny")
    assert ok.returncode == 0, ok.stderr
    clash = run_generate("--scenario", "merge", "--frames", "1", "--out", str(tmp_path), "--lidar", "vlp16")
    assert clash.returncode == 2 and "other settings" in clash.stderr


def test_scenario_parameters_are_part_of_a_runs_identity(tmp_path):
    base = ["--scenario", "overtaking", "--frames", "1", "--out", str(tmp_path), "--lidar", "tiny"]
    assert run_generate(*base).returncode == 0
    manifest = read_manifest(tmp_path / "train" / "overtaking_s000000")
    assert manifest.params["traffic_density"] == 1.0
    clash = run_generate(*base, "--traffic-density", "2.0")
    assert clash.returncode == 2 and "params" in clash.stderr
