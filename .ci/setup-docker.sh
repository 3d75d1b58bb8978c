#!/usr/bin/env bash
# Debian's Docker engine for the docker-marked tests; they start a private dockerd
# themselves (modelmora.testing.docker.PrivateDockerd) and stop it when they finish.
set -euo pipefail
if ! command -v dockerd >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >/dev/null
fi
dockerd --version
