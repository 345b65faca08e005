#!/usr/bin/env bash
# Installs pdpipe (in the active virtual environment, else .venv) at the versions constraints.txt pins,
# and launches the single-machine 1 prefill + 1 decode pipeline on the embedded demo model (generated
# on first use, then cached). Prints a curl line that works; Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
python -m pip install -q -c constraints.txt "torch==2.13.0" -e .
exec pdpipe launch "${1:-launch/single.toml}"
