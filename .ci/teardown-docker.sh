#!/usr/bin/env bash
# Safety net: a test run killed mid-way may leave its private dockerd behind.
pkill -f -- "--data-root /tmp/modelmora-dockerd-" 2>/dev/null || true
