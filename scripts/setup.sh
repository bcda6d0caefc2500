#!/usr/bin/env bash
# Create .venv (unless VENV is set to another path or "none") and install paddle-rlhf for CPU with
# its test tools. GPU users: see docs/installation.md (install paddlepaddle-gpu first, then
# `pip install -e ".[dev]"`).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ "$VENV" != "none" ]; then
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
  fi
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
fi
python -m pip install --upgrade pip >/dev/null
python -m pip install -e ".[cpu,dev]"
python - <<'PY'
import paddle, paddlenlp
print(f"paddle {paddle.__version__}, paddlenlp {paddlenlp.__version__}: OK")
PY
