#!/usr/bin/env bash
# Debian's Chromium for the status-page test (Playwright drives it via executable_path;
# Playwright's own browser download needs a host this machine cannot reach).
set -euo pipefail
if ! command -v chromium >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
chromium --version
