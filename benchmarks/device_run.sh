#!/usr/bin/env bash
# Runs on the lent GPU machine (through the device tool): installs the carried wheels, runs the GPU
# test suite and the GPU benchmarks, and leaves logs and JSON under $OUT.
#   usage: bash benchmarks/device_run.sh [tests] [bench STAGES]   (env: TESTS_K, TESTS_S, BENCH_S)
# .whl holds py3.12 manylinux wheels of what the machine lacks: pyzmq msgspec starlette uvicorn h11
# httptools uvloop click anyio sniffio prometheus-client redis msgpack pytest pluggy iniconfig
# pytest-timeout mooncake-transfer-engine-cuda13, and .whl/debs the .debs of libibverbs1
# ibverbs-providers libnl-3-200 libnl-route-3-200 (for Mooncake).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/debs; for deb in .whl/debs/*.deb; do dpkg -x "$deb" /tmp/debs; done 2>/dev/null  # Mooncake's verbs / netlink libraries
cudart=$(dirname "$(find /opt /usr/local -name 'libcudart.so.13*' 2>/dev/null | head -1)")
export LD_LIBRARY_PATH=/tmp/debs/usr/lib/x86_64-linux-gnu:$cudart${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
ln -sfn ../kernels pdpipe/kernels  # pdpipe.kernels without an install (setup.cfg maps it the same way)
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
nvidia-smi -L
while [ $# -gt 0 ]; do
  case "$1" in
    tests) timeout ${TESTS_S:-360} python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider --timeout 120 ${TESTS_K:+-k "$TESTS_K"} 2>&1 \
             | tee "$OUT/gpu_tests.log" | tail -40
           tar czf "$OUT/pipeline_logs.tgz" /tmp/pdp-*/logs 2>/dev/null; shift ;;
    bench) timeout ${BENCH_S:-540} python3 benchmarks/gpu_bench.py --only "$2" 2>&1 | tee "$OUT/bench_${2//,/_}.log" | tail -80
           tar czf "$OUT/bench_logs.tgz" /tmp/pdb-*/logs 2>/dev/null; shift 2 ;;
    *) echo "unknown step $1"; exit 2 ;;
  esac
done
