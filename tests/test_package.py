"""The package installs as four top-level packages, and `datasets` is ours, not Hugging Face's."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["v2x", "sim", "models", "datasets"])
def test_top_level_packages_come_from_this_repository(name):
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().parent == ROOT / name


def test_import_datasets_resolves_to_ours_from_any_directory(tmp_path):
    # a fresh interpreter started outside the repository, as a user's script would be
    code = "import datasets, datasets.native; print(datasets.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert Path(out.stdout.strip()).resolve() == ROOT / "datasets" / "__init__.py"
