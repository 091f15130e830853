#!/usr/bin/env bash
# The test suite on a fresh machine: set up .venv/ with the test dependencies, then pytest
# (arguments go to pytest; slow tests run only with `-m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
exec .venv/bin/python -m pytest -q "$@"
