#!/usr/bin/env bash
# The main job on a fresh machine: set up, build LeNet-5, train it on Fashion-MNIST, evaluate.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
netc check specs/lenet5.yaml
netc build specs/lenet5.yaml -o build/lenet5
netc train specs/lenet5.yaml --data fashion-mnist --out runs/lenet5 --force "$@"
netc eval specs/lenet5.yaml runs/lenet5/weights.npz --data fashion-mnist
