#!/usr/bin/env bash
# Installs pdpipe with its test dependencies and runs the CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0" -e ".[test]"
python3 -m pytest -q "$@"
