#!/usr/bin/env bash
# Installs everything the test suite needs into the active virtualenv, at the exact versions
# of the lock (requirements-dev.txt; regenerate it with `bash .ci/lock.sh`), then Debian's
# docker.io and chromium and the C++ llama-server (each .ci/setup-*.sh; llama-server is built
# from the pinned llama-cpp-python sdist: ~5 min on 2 idle cores the first time, cached under
# ~/.cache/modelmora/llama-server/ after). Idempotent. Needs root and Debian (apt-get).
# On 2 cores: about 15 min the first time (7 of them building llama-cpp-python from source),
# about 2 min once pip's cache holds the wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/lib.sh
if python -c 'import sys; sys.exit(sys.prefix != sys.base_prefix)'; then
    echo "setup.sh installs exact versions: activate a virtualenv first" >&2
    echo "  python -m venv .venv && . .venv/bin/activate" >&2
    exit 1
fi
LOCK=requirements-dev.txt
pip() { python -m pip --disable-pip-version-check --no-input "$@"; }
torch_pin=$(grep -E '^torch==' "$LOCK")
llama_pin=$(grep -E '^llama-cpp-python==' "$LOCK")
rest=$(mktemp)
trap 'rm -f "$rest"' EXIT
grep -vE '^(torch|llama-cpp-python)==' "$LOCK" >"$rest"

for script in .ci/setup-*.sh; do
    [ -e "$script" ] || continue
    step "$script" bash "$script"
done
# torch first and alone: the CPU build (on this kind of machine a local file; elsewhere add
# --extra-index-url https://download.pytorch.org/whl/cpu), never a multi-GB CUDA one
step "$torch_pin (CPU build)" pip install --quiet "$torch_pin"
step "the rest of $LOCK ($(grep -c '^[A-Za-z0-9]' "$rest") packages, exact versions)" \
    pip install --quiet -r "$rest"
step "$llama_pin: compiles llama.cpp the first time (5-10 min on 2 cores), seconds from pip's wheel cache after" \
    env CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" python -m pip --disable-pip-version-check --no-input \
    install --quiet --no-deps "$llama_pin"
step "modelmora itself (editable; its dependencies came from the lock)" pip install --quiet --no-deps -e .
step "pip check" pip check
