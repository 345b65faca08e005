#!/usr/bin/env bash
# Installs pdpipe and runs it on the embedded demo model (generated on first use, then cached).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0" -e .
exec pdpipe generate "$@"
