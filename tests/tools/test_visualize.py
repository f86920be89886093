"""tools/visualize.py and the BEV plotting it uses (sim/bev.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from datasets.native import run_path, write_scene_frame
from sim.bev import SEEN_BY_EGO, SEEN_BY_OTHERS_ONLY, UNSEEN, new_bev_figure, render_bev, visibility_classes
from tests.datasets.test_native import make_scene_frame
from tools.visualize import main

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png_not_blank(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    pixels = matplotlib.image.imread(path)  # (H, W, 4) floats in [0, 1]
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert float(pixels[..., :3].var()) > 0.0


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    for run in ("run_a", "run_b"):
        for f in (3, 4, 5):
            write_scene_frame(tmp_path / "data", "train", run, make_scene_frame(rng, frame=f, n_points=300))
    return tmp_path / "data"


def test_visibility_classes():
    counts = {4: np.array([3, 0, 0, 0]), 1: np.array([1, 5, 0, 0]), 9: np.array([0, 0, 0, 0])}
    classes = visibility_classes(counts, ego_id=4, num_boxes=4)
    assert classes.tolist() == [SEEN_BY_EGO, SEEN_BY_OTHERS_ONLY, UNSEEN, UNSEEN]
    masks = {4: np.array([False, True]), 1: np.array([True, False])}
    assert visibility_classes(masks, ego_id=1, num_boxes=2).tolist() == [SEEN_BY_EGO, SEEN_BY_OTHERS_ONLY]
    with pytest.raises(ValueError, match="entries"):
        visibility_classes({4: np.zeros(3)}, ego_id=4, num_boxes=4)


def test_render_bev_draws_one_outline_per_box_and_a_legend():
    scene = make_scene_frame(np.random.default_rng(1))
    _, ax = new_bev_figure()
    points = {cav: scan.points for cav, scan in scene.scans.items()}  # frame does not matter here
    render_bev(
        ax, points, scene.boxes_world, scene.agent_ids, scene.points_in_box, ego_id=4, view_range_m=50.0
    )
    assert len(ax.patches) == len(scene.agents)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "points of agent 4 (ego)" in labels
    assert any(label.startswith("occluded, seen by others") for label in labels)
    assert ax.get_xlim()[1] - ax.get_xlim()[0] == pytest.approx(100.0)


def test_script_renders_a_run(dataset, tmp_path):
    out = tmp_path / "bev.png"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "visualize.py"),
            str(run_path(dataset, "train", "run_a")),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    _assert_png_not_blank(out)


def test_yaml_input_in_the_ego_frame(dataset, tmp_path):
    out = tmp_path / "ego.png"
    yaml_path = run_path(dataset, "train", "run_b") / "9" / "000004.yaml"
    assert main([str(yaml_path), "--out", str(out), "--view", "ego", "--range", "40"]) == 0
    _assert_png_not_blank(out)


def test_a_failed_write_leaves_the_old_picture(dataset, tmp_path, monkeypatch):
    """PNGs are written atomically: a render that fails mid-write keeps the previous file intact
    and leaves no temporary file behind."""
    from matplotlib.figure import Figure

    out = tmp_path / "pictures" / "keep.png"
    yaml_path = run_path(dataset, "train", "run_b") / "9" / "000004.yaml"
    assert main([str(yaml_path), "--out", str(out)]) == 0
    before = out.read_bytes()

    def broken_savefig(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        main([str(yaml_path), "--out", str(out), "--range", "30"])
    assert out.read_bytes() == before
    assert [p.name for p in out.parent.iterdir()] == ["keep.png"]


def test_dataset_dir_gives_one_png_per_run(dataset, tmp_path):
    out = tmp_path / "pngs"
    assert main([str(dataset), "--out", str(out), "--frame", "5"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["train_run_a.png", "train_run_b.png"]
    for png in out.iterdir():
        _assert_png_not_blank(png)
    assert main([str(dataset / "train"), "--out", str(out / "one"), "--run", "run_b"]) == 0
    assert [p.name for p in (out / "one").iterdir()] == ["run_b.png"]


def test_clear_errors(dataset, tmp_path):
    with pytest.raises(SystemExit, match="no such file or folder"):
        main([str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="no frame 99"):
        main([str(run_path(dataset, "train", "run_a")), "--out", str(tmp_path / "x.png"), "--frame", "99"])
    with pytest.raises(SystemExit, match="no run named"):
        main([str(dataset), "--out", str(tmp_path / "d"), "--run", "nope"])
    with pytest.raises(SystemExit, match="no run folder"):
        main([str(dataset / "train" / "run_a" / "1"), "--out", str(tmp_path / "d")])  # a cav folder
    assert not (tmp_path / "x.png").exists()


def test_help_describes_the_inputs():
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "visualize.py"), "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
        check=False,
    )
    assert result.returncode == 0
    for word in ("FRAME_OR_DIR", "--out", "--frame", "--run", "run folder"):
        assert word in result.stdout
