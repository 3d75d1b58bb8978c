#!/usr/bin/env bash
# Builds llama.cpp's C++ `llama-server` (the `llamacpp` provider's runtime and the `llama`
# tests' binary) from the llama.cpp source that the pinned llama-cpp-python sdist carries under
# vendor/llama.cpp, so nothing but the package registry is needed. Cached by the sdist version
# under ${XDG_CACHE_HOME:-~/.cache}/modelmora/llama-server/<version>/llama-server: a second run
# finds it and returns in seconds. About 5-6 min on 2 cores the first time.
# Usage: bash .ci/setup-llama-server.sh   (prints the binary's path last)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
version=$(grep -E '^llama-cpp-python==' requirements-dev.txt | sed 's/^llama-cpp-python==//')
if [ -z "$version" ]; then
    echo "no llama-cpp-python pin in requirements-dev.txt" >&2
    exit 1
fi
cache="${XDG_CACHE_HOME:-$HOME/.cache}/modelmora/llama-server/$version"
binary="$cache/llama-server"
if [ -x "$binary" ] && "$binary" --version >/dev/null 2>&1; then
    echo "llama-server $version: cached at $binary ($((SECONDS - start)) s)"
    echo "$binary"
    exit 0
fi
python=${PYTHON:-python}
command -v "$python" >/dev/null || python=python3
if ! command -v cmake >/dev/null || ! command -v c++ >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        cmake g++ make >/dev/null
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m pip --disable-pip-version-check --no-input download --quiet \
    --no-binary llama-cpp-python --no-deps -d "$work" "llama-cpp-python==$version"
tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
# Shared libraries off: one self-contained binary that can be copied into the cache alone.
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >"$work/cmake.log" 2>&1 ||
    { cat "$work/cmake.log" >&2; exit 1; }
cmake --build "$work/build" --target llama-server -j "$(nproc)" >"$work/build.log" 2>&1 ||
    { tail -50 "$work/build.log" >&2; exit 1; }
mkdir -p "$cache"
install -m 0755 "$work/build/bin/llama-server" "$binary.tmp"
mv "$binary.tmp" "$binary"
"$binary" --version 2>&1 | head -2
echo "llama-server $version: built in $((SECONDS - start)) s, cached at $binary"
echo "$binary"
