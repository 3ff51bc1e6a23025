#!/usr/bin/env bash
# One-shot, idempotent set-up: Debian packages, the .venv, torch + torchvision, the project
# with its extras. Quiet when everything is already in place (a stamp records the inputs).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS=(libopencv-dev libturbojpeg0-dev pkg-config dataset-fashion-mnist wordnet-base openclipart-svg librsvg2-bin)
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
VENV=.venv
PY="$VENV/bin/python"
STAMP="$VENV/.declip-fast-setup"

log() { printf '[setup] %s\n' "$*"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@";
  elif command -v sudo >/dev/null 2>&1; then sudo "$@";
  else log "need root for: $*"; return 1; fi
}

missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The stamp holds a hash of everything that decides what goes into the venv.
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

if [ ! -x "$PY" ]; then
  log "creating $VENV"
  python3 -m venv "$VENV"
fi

# pip warns about every missing folder of this machine's local package index; that is noise.
pip_quiet() { "$PY" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
log "installing ${TORCH_PINS[*]} (from the local disk where available)"
pip_quiet install "${TORCH_PINS[@]}"
# ffcv's build imports numpy and pkgconfig and forgets to declare pillow; give it all three first.
pip_quiet install numpy pkgconfig pillow setuptools wheel
log "installing declip_fast with extras [dev,ffcv,train]"
pip_quiet install --no-build-isolation -e ".[dev,ffcv,train]" "${TORCH_PINS[@]}"
echo "$want" > "$STAMP"
log "done"
