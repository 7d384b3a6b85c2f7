#!/usr/bin/env bash
# Install letkd and everything its tests and quickstart need, on a fresh Debian machine with
# Python 3.11 (run as root or with sudo rights for apt). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
# Real data for the quickstart and the integration tests: Fashion-MNIST from Debian.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  $SUDO apt-get update -qq >/dev/null
  $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
PY=${PYTHON:-python3}
# torch/torchvision pinned to the builds this project is tested with.
$PY -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
$PY -m pip install -q --disable-pip-version-check -e ".[dev]"
