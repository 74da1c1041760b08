#!/usr/bin/env bash
# Regenerate tests/data/state_golden/ with arc-state 0.11.1 run as a black box (CLI + saved files),
# in a throwaway virtualenv that is never part of celltwin. See scripts/make_state_golden.py.
#
#   scripts/make_state_golden.sh [VENV_DIR] [-- extra args for make_state_golden.py]
#
# torch is installed first and pinned (CPU wheel), so arc-state's `torch>=2.7` does not pull a
# CUDA build. transformers is pinned to the last 4.x: arc-state 0.11.1's GPT2 backbone does not
# build with transformers 5.x (GPT2Attention has no `bias` buffer there), and 4.57.6 is the
# version the committed files were produced with.
set -euo pipefail
VENV="${1:-/tmp/arc-venv}"
shift || true
[[ "${1:-}" == "--" ]] && shift
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [[ ! -x "$VENV/bin/state" ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install "torch==2.13.0"
  "$VENV/bin/pip" install "arc-state==0.11.1" "transformers==4.57.6"
fi
"$VENV/bin/pip" freeze > "${TMPDIR:-/tmp}/state_golden_pip_freeze.txt"
exec "$VENV/bin/python" "$REPO/scripts/make_state_golden.py" "$@"
