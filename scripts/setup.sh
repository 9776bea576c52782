#!/usr/bin/env bash
# Shared set-up for scripts/start.sh and tests/run.sh (source it; do not run it directly).
#
# Idempotently:
#   1. installs the system packages napari's Qt canvas needs (Xvfb & co. for headless runs),
#   2. creates a virtual environment (.venv, or $CDPDNET_VENV),
#   3. installs PyTorch if the environment has none (see choose_torch below),
#   4. builds the napari-cdpdnet wheel and installs it with the extras in $CDPDNET_EXTRAS
#      (skipped when the sources and extras are those of the last install into this venv).
# Expects: $here (the checkout), log().
venv="${CDPDNET_VENV:-$here/.venv}"
python="${PYTHON:-python3}"
extras="${CDPDNET_EXTRAS:-all}"

# ---------------------------------------------------------------- 1. system packages
apt_packages=(xvfb xauth libgl1 libegl1 libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4
  libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xinerama0
  libxcb-xkb1 libdbus-1-3 libfontconfig1)
if command -v dpkg-query >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  missing=()
  for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
    log "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -q "${missing[@]}" </dev/null >/dev/null ||
      { $sudo apt-get update -q </dev/null >/dev/null && $sudo apt-get install -y -q "${missing[@]}" </dev/null >/dev/null; } ||
      log "could not install ${missing[*]} (no root or no network?): install them with apt-get yourself"
  fi
fi
if ! command -v xvfb-run >/dev/null 2>&1 && [ -z "${DISPLAY:-}" ]; then
  log "xvfb-run is missing and there is no DISPLAY: install Xvfb (e.g. apt-get install xvfb xauth)"
  exit 1
fi

# ---------------------------------------------------------------- 2. virtual environment
if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  "$python" -m venv "$venv"
fi
pip_() {  # quiet pip; hides the harmless "Location ... is ignored" lines of local mirrors
  "$venv/bin/python" -m pip -q --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2)
}

# ---------------------------------------------------------------- 3. PyTorch
# Kept out of the project's dependencies on purpose: the right build depends on the machine.
# $CDPDNET_TORCH overrides the choice (pip arguments), e.g. a pinned version or another index.
choose_torch() {
  if [ -n "${CDPDNET_TORCH:-}" ]; then        # e.g. "torch torchvision --index-url URL"
    echo "$CDPDNET_TORCH"
  elif [ "$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "torch torchvision --index-url https://download.pytorch.org/whl/cpu"  # CPU-only build
  else
    echo "torch torchvision"
  fi
}
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
  spec="$(choose_torch)"
  log "installing PyTorch: pip install $spec"
  # shellcheck disable=SC2086
  pip_ install $spec
fi
torch_version="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"

# ---------------------------------------------------------------- 4. the package, as a wheel
# Rebuilt only when the sources or the wanted extras changed since the last install into this
# environment (a stamp in the venv records both): a second start takes seconds, not a rebuild.
source_digest() {
  (cd "$here" && find pyproject.toml README.md napari.yaml napari_cdpdnet resources -type f \
      -not -path '*/__pycache__/*' -not -name '*.pyc' -print0 | LC_ALL=C sort -z |
      xargs -0 sha256sum | sha256sum | cut -c1-16)
}
stamp="$venv/.napari-cdpdnet-installed"
digest="$(source_digest)"
up_to_date=false
stamp_digest="" stamp_extras=""
if [ -f "$stamp" ] && "$venv/bin/python" -c "import napari_cdpdnet" >/dev/null 2>&1; then
  read -r stamp_digest stamp_extras <"$stamp" || true
  if [ "$stamp_digest" = "$digest" ]; then
    up_to_date=true
    for e in ${extras//,/ }; do
      [[ ",$stamp_extras," == *",$e,"* ]] || up_to_date=false
    done
  fi
fi
if $up_to_date; then
  log "napari-cdpdnet is up to date in $venv (sources unchanged since it was installed)"
else
  log "building the wheel"
  rm -rf "$here/dist"
  pip_ wheel --no-deps -w "$here/dist" "$here" >/dev/null
  wheel="$(ls "$here"/dist/napari_cdpdnet-*.whl)"
  log "installing $(basename "$wheel") with [$extras] (torch $torch_version kept)"
  pip_ install "torch==${torch_version%%+*}" "${wheel}[$extras]"
  pip_ install --force-reinstall --no-deps "$wheel"
  now="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
  [ "$now" = "$torch_version" ] || { log "torch changed from $torch_version to $now"; exit 1; }
  echo "$digest $extras" >"$stamp"
fi

