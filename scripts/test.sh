#!/usr/bin/env bash
# Installs pdpipe with its test dependencies (in the active virtual environment, else .venv) at the
# versions constraints.txt pins, and, where missing, the Redis server and the system libraries the
# Mooncake transfer engine loads; checks the code with ruff and mypy, and runs the CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v ip >/dev/null || need+=(iproute2)
ldconfig -p | grep -q 'libibverbs.so.1 ' || need+=(libibverbs1)
ldconfig -p | grep -q 'libnl-route-3.so.200 ' || need+=(libnl-3-200 libnl-route-3-200)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
fi
. scripts/env.sh
python -m pip install -q -c constraints.txt "torch==2.13.0" -e ".[test]"
python -m ruff check pdpipe tests benchmarks
python -m mypy
python -m pytest -q "$@"
