#!/usr/bin/env bash
# Set up napari-cdpdnet in .venv (first run only) and open napari with the plugin docked.
#
#   bash scripts/start.sh                   # empty viewer with the CDPDNet docks
#   bash scripts/start.sh scan.nii.gz       # ... with a CT (file or DICOM folder) opened
#
# The viewer is `cdpdnet view` from .venv: each CT is opened with the napari-cdpdnet reader (no
# "Choose reader" dialog), the segmentation and structure-table docks are added (as two tabs).
# The model weights are fetched with the dock's "Download weights" button (or set
# CDPDNET_WEIGHTS_DIR to a folder made by 'cdpdnet weights download --to DIR' on a machine with
# internet access). Environment: CDPDNET_VENV (default .venv), CDPDNET_TORCH (pip arguments for
# PyTorch, default: the CPU build where there is no NVIDIA GPU).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { printf '\033[1m[scripts/start.sh]\033[0m %s\n' "$*" >&2; }
CDPDNET_EXTRAS="all"
(cd "$here" && source "$here/scripts/setup.sh")
venv="${CDPDNET_VENV:-$here/.venv}"
log "the command line: 'source $venv/bin/activate', then 'cdpdnet --help' (or run $venv/bin/cdpdnet)"
exec "$venv/bin/cdpdnet" view "$@"
