"""Tiny generated datasets for the perception tool tests (imported by name, like the other helpers)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
