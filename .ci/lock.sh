#!/usr/bin/env bash
# Regenerates requirements-dev.txt, the locked dev/test/CI environment, from the ranges in
# pyproject.toml, then run the tests and commit both files together:
#   bash .ci/lock.sh                          keep the pins that still fit, add/drop what changed
#   bash .ci/lock.sh --upgrade                every package to the newest release that fits
#   bash .ci/lock.sh --upgrade-package NAME   just that one
#
# Why pip-tools (pip-compile): its output is a plain requirements file of exact pins that
# pip itself installs (`pip install -r`), so the lock is resolved and installed by the same
# pip, under the same configuration: this machine's local CPU build of torch (find-links)
# and its torch cap. uv and Poetry ignore pip's configuration and would resolve a
# multi-GB CUDA torch; PEP 751's pylock.toml is not installable by pip yet. Dependabot and
# Renovate read pip-compile output too.
#
# The library itself keeps ranges (users combine it with their own stack); only this file
# is exact. Extras covered: dev (test tools and every optional runtime the tests use),
# torch, llama, ray. torch is pinned to 2.13.0 by .ci/lock-pins.in (a free torch resolves to a
# CUDA build of several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP_TOOLS="pip-tools==7.6.2"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$PIP_TOOLS"
echo "resolving (a few minutes: llama-cpp-python's metadata comes from its source package) …"
start=$SECONDS
CUSTOM_COMPILE_COMMAND="bash .ci/lock.sh" "$work/venv/bin/pip-compile" --quiet --strip-extras --allow-unsafe \
    --no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
    --extra dev --extra torch --extra llama --extra ray \
    --output-file requirements-dev.txt \
    "$@" pyproject.toml .ci/lock-pins.in
# The extras name modelmora itself (dev = "modelmora[docker,...]"), which pip-compile pins
# as "modelmora @ file:///this/checkout": drop it, setup.sh installs the checkout editable.
python - <<'PY'
import re
from pathlib import Path

lock = Path("requirements-dev.txt")
lock.write_text(re.sub(r"^modelmora @ .*\n(    #.*\n)*", "", lock.read_text(), flags=re.M))
PY
echo "requirements-dev.txt: $(grep -c '^[a-zA-Z0-9]' requirements-dev.txt) pinned packages in $((SECONDS - start))s"
