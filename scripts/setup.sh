#!/usr/bin/env bash
# Installs what netcompiler needs on a fresh Debian machine, idempotently: Debian packages that
# are missing (a C compiler, Fashion-MNIST, venv support, Python's headers) and, in a virtualenv
# in the checkout (.venv/), the package itself (editable, so the checkout's code is what runs).
# The machine's own Python is never installed into.
#   scripts/setup.sh          the package and its run-time dependencies
#   scripts/setup.sh --test   also the test dependencies (pyproject's `test` extra; torch
#                             2.13.0, CPU build, is a local file on the project's machines)
# Afterwards: `. .venv/bin/activate` puts `netc` on PATH, or call `.venv/bin/netc` directly.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  "") target="." ;;
  --test) target=".[test]" ;;
  *) echo "usage: scripts/setup.sh [--test]" >&2; exit 2 ;;
esac
PYTHON=python3
command -v "$PYTHON" >/dev/null || { echo "setup: error: no python3 (apt-get install -y python3)" >&2; exit 1; }
venv_ok() { [ -x .venv/bin/python ] && .venv/bin/python -m pip --version >/dev/null 2>&1; }

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi
need_apt=()
command -v cc >/dev/null || command -v gcc >/dev/null || need_apt+=(gcc)
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
# Debian's python3 makes virtualenvs (with pip) only with python3-venv
venv_ok || "$PYTHON" -c "import ensurepip" 2>/dev/null || need_apt+=(python3-venv)
# Net.forward's C fast path (netcompiler/fastcall.c) is compiled against Python's headers
"$PYTHON" -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || need_apt+=(python3-dev)
if [ "$target" = ".[test]" ]; then
  # the tests also compile exported C with clang, draw specs with Graphviz, and run exported C
  # on an emulated Cortex-M4F (the Arm toolchain, newlib for semihosting, QEMU)
  command -v clang >/dev/null || need_apt+=(clang)
  command -v dot >/dev/null || need_apt+=(graphviz)
  command -v arm-none-eabi-gcc >/dev/null || need_apt+=(gcc-arm-none-eabi)
  [ -d /usr/lib/arm-none-eabi/newlib ] || need_apt+=(libnewlib-arm-none-eabi)
  command -v qemu-system-arm >/dev/null || need_apt+=(qemu-system-arm)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install -y ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

if ! venv_ok; then
  echo "setup: creating the virtualenv .venv/ ($("$PYTHON" --version))"
  "$PYTHON" -m venv --clear .venv
fi
echo "setup: pip install -e '$target' into .venv/"
.venv/bin/python -m pip install -q --disable-pip-version-check -e "$target"
