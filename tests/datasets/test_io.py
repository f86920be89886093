"""Atomic and deterministic writes (datasets/io.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from datasets.io import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    is_temporary,
    write_npz_deterministic,
)


def test_atomic_write_creates_and_replaces(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "first\n")
    assert path.read_text() == "first\n"
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_failed_block_keeps_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "cloud.pcd"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".pcd" and is_temporary(tmp)
        tmp.write_bytes(b"half a fi")
        raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["cloud.pcd"]


def test_temporary_name_can_hide_the_suffix(tmp_path):
    with atomic_path(tmp_path / "000001.yaml", keep_suffix=False) as tmp:
        assert not tmp.name.endswith(".yaml")  # OpenCOOD lists *.yaml: it must not see this
        tmp.write_text("x: 1\n")
    assert (tmp_path / "000001.yaml").read_text() == "x: 1\n"


def test_missing_directory_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write_text(tmp_path / "nope" / "a.txt", "x")


def test_is_temporary():
    assert is_temporary(".000001.pcd.tmp-abc.pcd")
    assert not is_temporary("000001.pcd")
    assert not is_temporary(".hidden")


def _arrays(rng):
    return {
        "intensity": rng.random(100, dtype=np.float32),
        "instance_id": rng.integers(-1, 10, 100).astype(np.int32),
        "kinds": np.array(["car", "truck", "bus"]),
        "scalar": np.array(3.5),
    }


def test_npz_round_trip_and_bytes_do_not_depend_on_the_clock(tmp_path, monkeypatch):
    arrays = _arrays(np.random.default_rng(0))
    monkeypatch.setattr(time, "time", lambda: 1_000_000_000.0)
    write_npz_deterministic(tmp_path / "a.npz", arrays)
    monkeypatch.setattr(time, "time", lambda: 1_700_000_123.0)
    write_npz_deterministic(tmp_path / "b.npz", arrays)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with np.load(tmp_path / "a.npz", allow_pickle=False) as npz:
        assert list(npz.files) == list(arrays)
        for name, value in arrays.items():
            assert npz[name].dtype == value.dtype
            np.testing.assert_array_equal(npz[name], value)


def test_npz_rejects_object_arrays_and_bad_names(tmp_path):
    with pytest.raises(ValueError, match="object"):
        write_npz_deterministic(tmp_path / "a.npz", {"x": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ValueError, match="name"):
        write_npz_deterministic(tmp_path / "a.npz", {"a/b": np.zeros(2)})
    assert list(tmp_path.iterdir()) == []
