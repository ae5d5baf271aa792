#!/usr/bin/env bash
# Make sure the Fashion-MNIST Debian package (dataset-fashion-mnist) is installed.
set -euo pipefail
dir="${CLUSTERLENS_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
if [ -f "$dir/train-images-idx3-ubyte.gz" ] && [ -f "$dir/t10k-images-idx3-ubyte.gz" ]; then
  exit 0
fi
echo "Fashion-MNIST is not in $dir: installing Debian's dataset-fashion-mnist package (30 MB)..."
if command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else SUDO="none"; fi
  if [ "$SUDO" != none ]; then
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist && exit 0
  fi
fi
cat >&2 <<MSG
Could not install Fashion-MNIST automatically (no apt-get, or no root/sudo).
Either install it yourself:      sudo apt-get install -y dataset-fashion-mnist
or copy the four idx .gz files (train/t10k images and labels) into a folder and set
CLUSTERLENS_FASHION_MNIST_DIR to it, then run make again.
MSG
exit 1
