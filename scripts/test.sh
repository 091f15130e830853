#!/usr/bin/env bash
# The test suite on a fresh machine: set up (with test dependencies), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
python3 -m pytest -q "$@"
