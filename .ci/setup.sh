#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh machine (idempotent):
# the package with its extras, then each .ci/setup-*.sh (runtimes, system packages).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
for script in .ci/setup-*.sh; do
    [ -e "$script" ] || continue
    echo "== $script"
    bash "$script"
done
