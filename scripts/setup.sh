#!/usr/bin/env bash
# Installs everything netcompiler needs on a fresh machine (idempotent).
#   scripts/setup.sh          runtime: the package, a C compiler, Fashion-MNIST
#   scripts/setup.sh --test   also the test-only dependencies (pytest, hypothesis, torch CPU 2.13.0)
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi

need_apt=()
command -v cc >/dev/null || command -v gcc >/dev/null || need_apt+=(gcc)
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install -y ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

python3 -m pip install -q --disable-pip-version-check -e .
if [ "${1:-}" = "--test" ]; then
  python3 -m pip install -q --disable-pip-version-check "pytest>=7" "hypothesis>=6"
  # the CPU build of torch 2.13.0 is a local file on these machines; a test-only dependency
  python3 -c "import torch" 2>/dev/null || python3 -m pip install -q --disable-pip-version-check torch==2.13.0
fi
