#!/usr/bin/env bash
# Set up .venv (if needed), then the main job: the whole stack end to end on the embedded simulator
# (tools/pipeline.py with configs/pipeline/demo.yaml, under 15 minutes on 2 CPU cores): a small
# dataset, an ego-only and a cooperative detector trained and evaluated (AP, bytes, latency),
# planners with ego-only and cooperative observations evaluated closed loop, pictures, and
# outputs/demo/report.md. Override the folder with OUT=...; extra arguments are key.sub=value
# overrides of the pipeline config (e.g. perception.steps=100). Re-running resumes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
OUT=${OUT:-outputs/demo}
.venv/bin/python tools/pipeline.py --config configs/pipeline/demo.yaml --out "$OUT" "$@"
