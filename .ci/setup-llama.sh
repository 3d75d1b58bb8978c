#!/usr/bin/env bash
# The real llama.cpp server (llama-cpp-python, built from source: ~4-5 min on 2 cores)
# and gguf, with which the tests write their tiny models.
set -euo pipefail
if ! python -c "import llama_cpp.server" 2>/dev/null; then
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" python -m pip install --quiet --disable-pip-version-check \
        "llama-cpp-python[server]>=0.3"
fi
python -m pip install --quiet --disable-pip-version-check "gguf>=0.10"
