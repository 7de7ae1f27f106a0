#!/usr/bin/env bash
# Set up gansem in ./.venv (idempotent). Usage:
#   bash scripts/setup.sh           # library, CLIs, the faces extra (dlib + its 68-point landmark model, for
#                                   #   --labels faces), the bundled DCGAN weights (gan-face-generate, --no-deps)
#   bash scripts/setup.sh --test    # + test-only dependencies (pytest, scikit-learn, PyTorch CPU for parity checks,
#                                   #   Playwright + Debian's Chromium for the painting page's browser test)
#   bash scripts/setup.sh --bench   # + benchmark baselines (scikit-learn, faiss-cpu)
#   bash scripts/setup.sh --cuda    # + jax[cuda12] for NVIDIA GPUs
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
want_test=0; want_bench=0; want_cuda=0
for a in "$@"; do
  case "$a" in
    --test) want_test=1 ;;
    --bench) want_bench=1 ;;
    --cuda) want_cuda=1 ;;
    *) echo "unknown option $a" >&2; exit 2 ;;
  esac
done
# The painting page's browser test (tests/test_uscs_page.py) drives Debian's Chromium with Playwright; Playwright's
# own browser download (`playwright install`) is never used. GANSEM_CHROMIUM=/path names another Chromium;
# GANSEM_SKIP_BROWSER=1 skips the browser test (and this step).
install_chromium() {
  if [ "${GANSEM_SKIP_BROWSER:-}" = 1 ]; then return; fi
  if [ -n "${GANSEM_CHROMIUM:-}" ]; then
    [ -x "$GANSEM_CHROMIUM" ] && return
    echo "setup.sh: GANSEM_CHROMIUM=$GANSEM_CHROMIUM is not an executable Chromium" >&2; exit 1
  fi
  [ -x /usr/bin/chromium ] && return
  local why="" sudo=""
  if ! command -v apt-get >/dev/null 2>&1; then
    why="there is no apt-get on this system"
  elif [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else why="installing packages needs root, and sudo is missing"; fi
  fi
  if [ -z "$why" ]; then
    echo "setup.sh: installing Debian's chromium and chromium-driver for the browser test (apt-get)"
    if $sudo apt-get update -q && $sudo env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends chromium chromium-driver && [ -x /usr/bin/chromium ]; then
      return
    fi
    why="apt-get install chromium chromium-driver failed"
  fi
  echo "setup.sh: the painting page's browser test needs Chromium at /usr/bin/chromium, and $why." >&2
  echo "  Install Debian's chromium package, or set GANSEM_CHROMIUM=/path/to/chromium, or GANSEM_SKIP_BROWSER=1" \
       "to skip that test." >&2
  exit 1
}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
# The faces extra (dlib-bin, face-recognition-models) gives evaluate.py / separability.py --labels faces.
$PIP install -q --disable-pip-version-check -e '.[faces]'
# The embedded default model: only its weights.tar is used (the package's own code needs torch; not installed).
$PIP install -q --disable-pip-version-check --no-deps gan-face-generate==1.1.1
if [ $want_cuda = 1 ]; then $PIP install -q -e '.[cuda]'; fi
if [ $want_test = 1 ]; then
  $PIP install -q --disable-pip-version-check -e '.[test]'
  # test-only parity references: PyTorch (CPU wheel) and the BigGAN reference module (code only)
  $PIP install -q --disable-pip-version-check torch==2.13.0
  $PIP install -q --disable-pip-version-check --no-deps pytorch-pretrained-biggan==0.1.1
  install_chromium
fi
if [ $want_bench = 1 ]; then
  $PIP install -q --disable-pip-version-check -e '.[eval]' faiss-cpu
fi
# Port the bundled DCGAN into a gansem checkpoint (torch-free reader; nothing from the file is executed).
[ -f checkpoints/dcgan-digiface/generator.json ] || .venv/bin/python -m weights_port convert dcgan-digiface checkpoints/dcgan-digiface
echo "gansem is set up in .venv"
