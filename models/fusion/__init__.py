"""Fusion methods, one file each: early (raw points), late (boxes), AttFuse (per-cell attention
across agents), CORE (confidence-driven requests and attentive aggregation). "No fusion" (the ego
alone) needs no module: the ego's own features go to the heads."""
