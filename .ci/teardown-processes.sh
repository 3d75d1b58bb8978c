#!/usr/bin/env bash
# Safety net after `.ci/run`, for a test run killed mid-way: stops whatever this CI run
# started that is still alive (a private dockerd, a server), found by the CI_RUN_MARKER that
# .ci/run exported and every process it started inherited, and removes a private dockerd's
# temporary root. Nothing else on the machine is touched (no pkill by name).
set -uo pipefail
[ -n "${CI_RUN_MARKER:-}" ] || exit 0
python - <<'PY'
import os
import re
import shutil
from pathlib import Path

import psutil

from modelmora.testing.docker import unmount_below
from modelmora.testing.leaks import describe, leftovers, reap

left = leftovers(os.environ["CI_RUN_MARKER"], variable="CI_RUN_MARKER", grace=0, descendants=False)
if left:
    print("teardown: stopping what this run left behind:\n" + describe(left))
    roots = set()
    for proc in left:
        try:
            found = re.search(r"--data-root (/tmp/modelmora-dockerd-[^/ ]+)/data", " ".join(proc.cmdline()))
        except psutil.Error:
            continue
        if found:
            roots.add(Path(found.group(1)))
    reap(left)
    for root in roots:
        unmount_below(root)
        shutil.rmtree(root, ignore_errors=True)
PY
