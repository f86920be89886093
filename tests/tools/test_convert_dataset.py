"""tools/convert_dataset.py: real runs, the summary, resuming, --check and exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tools import convert_dataset

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "convert_dataset.py"


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("native")
    args = ["--scenario", "red_light", "--frames", "2", "--lidar", "tiny", "--out", str(out)]
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "generate.py"), *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return out


def test_script_converts_with_progress_and_summary_then_checks(native, tmp_path):
    dst = tmp_path / "opv2v"
    out = run_tool("--src", str(native), "--dst", str(dst), "--dst-format", "opv2v")
    assert out.returncode == 0, out.stderr
    assert "native -> opv2v: 2 frames converted, 0 already complete, 4 views, 2 agents" in out.stdout
    assert "boxes: " in out.stdout and "car " in out.stdout
    assert "2/2" in out.stderr  # the progress bar
    assert sorted(p.name for p in (dst / "train" / "red_light_s000000" / "0").iterdir()) == [
        "000000.pcd",
        "000000.yaml",
        "000001.pcd",
        "000001.yaml",
    ]
    check = run_tool("--check", str(dst))
    assert check.returncode == 0 and "0 problem(s)" in check.stdout


def test_resume_check_and_errors_in_process(native, tmp_path, capsys):
    dst = tmp_path / "kitti"
    assert convert_dataset.main(["--src", str(native), "--dst", str(dst), "--dst-format", "kitti", "--quiet"]) == 0
    first = capsys.readouterr().out
    assert "native -> kitti: 4 frames converted" in first and "boxes: " in first
    label = dst / "training" / "label_2" / "000003.txt"
    label.unlink()  # as if interrupted before the last frame's completion mark
    assert convert_dataset.main(["--src", str(native), "--dst", str(dst), "--dst-format", "kitti", "--quiet"]) == 0
    assert "1 frames converted, 3 already complete" in capsys.readouterr().out
    assert label.is_file()

    assert convert_dataset.main(["--check", str(dst)]) == 0
    bin_path = dst / "training" / "velodyne" / "000001.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-3])
    calib = dst / "training" / "calib" / "000002.txt"
    calib.write_text("garbage\n")
    assert convert_dataset.main(["--check", str(dst), "--format", "kitti"]) == 1
    captured = capsys.readouterr()
    assert f"{bin_path}: truncated or corrupt" in captured.out
    assert f"{calib}: line 1: expected 'KEY: numbers'" in captured.out
    assert "problem(s)" in captured.err

    # a conversion that meets the damaged file stops with its name, exit code 2
    assert convert_dataset.main(["--src", str(dst), "--dst", str(tmp_path / "back"), "--dst-format", "native", "--quiet"]) == 2
    assert f"error: {bin_path}: truncated" in capsys.readouterr().err


def test_bad_arguments_exit_2(native, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        convert_dataset.main(["--src", str(native), "--dst-format", "kitti"])
    assert err.value.code == 2
    with pytest.raises(SystemExit) as err:
        convert_dataset.main(["--check", str(native), "--src", str(native)])
    assert err.value.code == 2
    with pytest.raises(SystemExit):
        convert_dataset.main(["--src", str(native), "--dst", str(tmp_path), "--dst-format", "nuscenes"])
    assert convert_dataset.main(["--src", str(tmp_path / "none"), "--dst", str(tmp_path / "o"), "--dst-format", "kitti"]) == 2
    assert "error: no such folder" in capsys.readouterr().err
