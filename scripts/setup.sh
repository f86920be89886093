#!/usr/bin/env bash
# Set up .venv/ at the project root with everything the stack needs, on a fresh Debian machine.
#
# Idempotent: a stamp in .venv/ remembers the hash of this script and pyproject.toml, so a second
# run returns at once. Order matters (see docs/install.md):
#   1. Debian packages (libusb-1.0-0 for Open3D's import),
#   2. torch==2.13.0 (CPU wheel) before anything that depends on torch,
#   3. mmcv 2.1.0 built from source (full ops; ~6 min on 2 cores, then cached by pip's wheel cache),
#   4. the rest, pinned, and the project itself in editable mode.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.setup-stamp
want=$(cat scripts/setup.sh pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

log() { printf '\n==> %s\n' "$*"; }

# --- 1. Debian packages -------------------------------------------------------------------------
if ! ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0'; then
  log "installing Debian package libusb-1.0-0 (needed by open3d at import time)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libusb-1.0-0 >/dev/null
fi

# --- 2. venv and torch --------------------------------------------------------------------------
[ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off)

log "torch 2.13.0 (CPU build; installed first so nothing pulls a CUDA build)"
"${PIP[@]}" "torch==2.13.0"

# --- 3. mmcv 2.1.0 from source ------------------------------------------------------------------
if ! "$VENV/bin/python" -c "import mmcv, mmcv.ops" 2>/dev/null; then
  log "building mmcv 2.1.0 with its ops (about 6 minutes on 2 cores, cached afterwards)"
  "${PIP[@]}" "setuptools==80.9.0" ninja wheel
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} "${PIP[@]}" --no-build-isolation "mmcv==2.1.0"
fi

# --- 4. everything else, pinned -----------------------------------------------------------------
log "mmdet, mmdet3d, spconv (CPU), open3d, carla client and the project"
"${PIP[@]}" \
  "mmengine==0.10.7" "mmdet==3.2.0" "mmdet3d==1.4.0" \
  "spconv==2.3.8" "open3d==0.20.0" "numpy-quaternion==2024.0.13" "carla==0.9.16" \
  "numpy<2" "torch==2.13.0"
"${PIP[@]}" -e ".[dev]" "torch==2.13.0" "numpy<2"

echo "$want" > "$STAMP"
log "set-up complete: $VENV"
