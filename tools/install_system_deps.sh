#!/usr/bin/env bash
# System packages for a fresh Debian/Ubuntu machine: what ffcv 1.0.2 compiles against, Python's
# headers and venv when the system Python lacks them, and the offline Fashion-MNIST data set.
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
PYTHON="${PYTHON:-python3}"
packages="pkg-config g++ libopencv-dev libturbojpeg0-dev dataset-fashion-mnist"
# ffcv builds a C++ extension (needs Python.h); we install into a virtual environment (needs venv).
"$PYTHON" - <<'PY' || packages="$packages python3-dev"
import os, sysconfig, sys
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)
PY
"$PYTHON" -c "import ensurepip, venv" 2>/dev/null || packages="$packages python3-venv"
missing=""
for p in $packages; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "installing system packages:$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
fi
