#!/usr/bin/env bash
# The test suite: pytest (unit, gloo multi-process, real vLLM engine) then mypy strict.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/python -m pytest -q -ra tests "$@"
.venv/bin/mypy
