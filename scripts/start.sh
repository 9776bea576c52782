#!/usr/bin/env bash
# Set up napari-cdpdnet in .venv (first run only) and open napari with the plugin docked.
#
#   bash scripts/start.sh                   # empty viewer with the CDPDNet widgets
#   bash scripts/start.sh scan.nii.gz       # ... with a CT (file or DICOM folder) opened
#
# The model weights are fetched on the first segmentation (or set CDPDNET_WEIGHTS_DIR to a
# folder made by 'cdpdnet weights download --to DIR' on a machine with internet access).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { printf '\033[1m[scripts/start.sh]\033[0m %s\n' "$*" >&2; }
CDPDNET_EXTRAS="all"
(cd "$here" && source "$here/scripts/setup.sh")
venv="${CDPDNET_VENV:-$here/.venv}"
args=()
for a in "$@"; do args+=("$(realpath "$a")"); done
exec "$venv/bin/napari" -w napari-cdpdnet "${args[@]}"
