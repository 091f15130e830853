#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv/, train LeNet-5 on Fashion-MNIST (netc train
# checks the spec and builds the C first), evaluate the weights on the test set.
# Each run trains into a new directory, runs/lenet5, then runs/lenet5-2, -3, ...: a previous
# run is never replaced.  Extra arguments go to netc train (e.g. --epochs 2).
set -euo pipefail
cd "$(dirname "$0")/.."
for arg in "$@"; do
  case "$arg" in
    --out|--out=*|--resume|--force)
      echo "train_lenet5.sh: error: $arg: this script picks a new run directory; use .venv/bin/netc train for that" >&2
      exit 1 ;;
  esac
done
scripts/setup.sh
run=runs/lenet5
n=2
while [ -e "$run" ]; do run="runs/lenet5-$n"; n=$((n + 1)); done
.venv/bin/netc train specs/lenet5.yaml --data fashion-mnist --out "$run" "$@"
.venv/bin/netc eval specs/lenet5.yaml "$run/weights.npz" --data fashion-mnist
