#!/usr/bin/env bash
# Proves the version floor declared in pyproject.toml: makes a fresh virtual environment, installs
# the lowest supported torch and Lightning (torchvision is the release paired with that torch),
# then this package with its dev extra, prints the versions and runs the test suite there.
# Tests that need a newer torch (e.g. torch.optim.Muon) skip themselves with the reason.
#
#   tests/compat/run_floor.sh                 # the whole suite
#   tests/compat/run_floor.sh tests/test_optimizer.py -q   # extra arguments go to pytest
#   REUSE=1 tests/compat/run_floor.sh ...   # skip the install, reuse the floor venv
#   TORCH=2.7.0 TORCHVISION=0.22.0 LIGHTNING=2.5.0 tests/compat/run_floor.sh   # another pair
#
# Slow (downloads torch, about 3 GB with its CUDA libraries, then the suite): not part of .ci/run.
set -euo pipefail
cd "$(dirname "$0")/../.."
TORCH=${TORCH:-2.7.0}
TORCHVISION=${TORCHVISION:-0.22.0}
LIGHTNING=${LIGHTNING:-2.5.0}
PYTHON=${PYTHON:-python3}
VENV=${VENV:-${TMPDIR:-/tmp}/lightning_muon_floor_venv}

if [ "${REUSE:-0}" != 1 ] || [ ! -x "$VENV/bin/python" ]; then  # REUSE=1: keep an existing floor venv
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "torch==$TORCH" "torchvision==$TORCHVISION" "lightning==$LIGHTNING" -e ".[dev]"
fi
"$VENV/bin/python" - <<'PY'
import sys, torch, torchvision, lightning, torchmetrics
print(f"floor run: python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"lightning {lightning.__version__}, torchmetrics {torchmetrics.__version__}")
PY
exec "$VENV/bin/python" -m pytest "$@"
