#!/usr/bin/env bash
# Make the demo data available: Fashion-MNIST IDX files from Debian's dataset-fashion-mnist package.
set -euo pipefail
DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DIR/t10k-labels-idx1-ubyte.gz" ]; then
  echo "Fashion-MNIST found in $DIR"; exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
    echo "installing the Debian package dataset-fashion-mnist"
    $SUDO apt-get install -y dataset-fashion-mnist >/dev/null 2>&1 || \
      { $SUDO apt-get update >/dev/null 2>&1 && $SUDO apt-get install -y dataset-fashion-mnist >/dev/null; } || true
  fi
fi
if [ -f "$DIR/t10k-labels-idx1-ubyte.gz" ]; then echo "Fashion-MNIST installed in $DIR"; exit 0; fi
cat >&2 <<MSG
Fashion-MNIST is missing. Do one of:
  * on Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist
  * download the four IDX .gz files of Fashion-MNIST (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
    t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) into a folder and run
    make demo DEMO_ARGS="data.root=/that/folder"
MSG
exit 1
