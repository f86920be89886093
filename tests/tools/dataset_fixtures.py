"""Tiny generated datasets for the perception tool tests, and loading a tool script as a module
(imported by name, like the other helpers)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def generate_tiny(root: Path, seed: int, split: str = "train", frames: int = 2, cavs: int = 3) -> Path:
    """Run tools/generate.py (random_traffic, tiny LiDAR) into ``root``; returns ``root``."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "generate.py"), "--scenario", "random_traffic", "--frames", str(frames),
         "--seed", str(seed), "--out", str(root), "--lidar", "tiny", "--cavs", str(cavs), "--split", split],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return root


def load_tool(name: str) -> ModuleType:
    """``tools/<name>.py`` as a module, to call its ``main(argv)`` in-process."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses defined in the tool look their module up
    spec.loader.exec_module(module)
    return module
