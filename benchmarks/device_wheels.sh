#!/usr/bin/env bash
# Fills .whl (ignored) with the py3.12 manylinux wheels the lent GPU machine lacks, for device_run.sh to
# install there (the machine has no network; the device tool carries .whl). `--mooncake` adds
# mooncake-transfer-engine-cuda13 (~50 MB) and, in .whl/debs, the Debian libraries it loads.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=(pyzmq==27.3.0 msgspec==0.23.0 starlette==1.10.0 uvicorn==0.55.0 h11==0.16.0 httptools==0.9.0 uvloop==0.23.0
        click==8.5.1 anyio==4.16.0 sniffio==1.3.1 prometheus-client==0.26.0 redis==8.2.0 msgpack==1.2.4
        pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pytest-timeout==2.4.0 pytest-xdist==3.8.0 execnet==2.1.2)
[ "${1:-}" = --mooncake ] && wheels+=(mooncake-transfer-engine-cuda13)
platforms=(); for p in manylinux_2_35 manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${p}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl "${wheels[@]}"
if [ "${1:-}" = --mooncake ]; then
  mkdir -p .whl/debs && (cd .whl/debs && apt-get download libibverbs1 ibverbs-providers libnl-3-200 libnl-route-3-200)
fi
ls .whl
