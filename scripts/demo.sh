#!/usr/bin/env bash
# Set up .venv (if needed), then the main job on the embedded simulator: a small dataset on every
# scenario and a bird's-eye-view picture of each run. Output: outputs/demo/ (override with OUT=...).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
PY=.venv/bin/python
OUT=${OUT:-outputs/demo}
FRAMES=${FRAMES:-10}

for scenario in overtaking left_turn red_light merge random_traffic; do
  "$PY" tools/generate.py --scenario "$scenario" --frames "$FRAMES" --seed 0 --out "$OUT/dataset" --lidar hdl64
done
"$PY" tools/visualize.py "$OUT/dataset" --out "$OUT/bev" --frame 0 --range 60
echo "dataset: $OUT/dataset   pictures: $OUT/bev"
