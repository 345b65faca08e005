#!/usr/bin/env bash
# Runs on the lent GPU machine (through the device tool): installs the carried wheels, runs the GPU
# test suite and the GPU benchmarks, and leaves logs and JSON under $OUT.
#   usage: bash benchmarks/device_run.sh [tests] [samespeed OLD_TREE] [prefixcache] [prefixcompare] [quantkernels (env QUANT_ONLY: gemm,moe; QUANT_ARGS: --shapes/--rows)] [w8a8 (fp8 8B served, W8A8 against weight-only; env W8A8_INPUT, W8A8_OUTPUT, W8A8_RATES)] [quant70b] [ernie300b (env E300_LAYERS, E300_QUANT)] [bench STAGES] [probe (the GIL probe)] [int4layouts (probes/int4_layouts.py)] [autotunecache (probes/autotune_cache.py; env CACHE_ARGS)] [lengths (the new-length probe)] [prefill INPUT_LEN PROMPTS] [tp70b] [moe] [moebench (moe without the compare)] [moecompare (its compare alone)] [moesweep] [ep2] [dp2] [tp4 (four GPUs)]
#          [compare NAME INPUT_LEN OUTPUT_LEN RATES]
#   env: QUANT_SCHEMES (quantdecode's, default wint4,fp8,wint8), TESTS_PATHS (default tests/gpu), TESTS_K, TESTS_S, TESTS_T (a test's limit, default 120 s), TESTS_N (pytest-xdist workers: Triton compiles in parallel, but the GPU-memory-share test of test_engine_gpu.py then counts the other workers' memory; the GEMM test's
#   ragged shapes compile hundreds of variants), BENCH_S; for compare: LAYOUTS (of 1p1d (decode_busy_ms 12), 1p1d-always
#   (every prompt on prefill, decode_busy_ms 0), 1p1d-backlog (local_on_backlog on), 1p1d-busy
#   (decode_busy_ms = BUSY_MS, default 12), 1p1d-nobusy (decode_busy_ms 0), 2mixed; default
#   1p1d 1p1d-always 2mixed),
#   PROMPTS (requests per rate, default 150), SLO (default "ttft:600 tpot:15"), COMPARE_S; for moe:
#   MOE_LAYOUTS (of 1p1d 2mixed dp2; default 1p1d 2mixed), MOE_RATES; for moesweep: SWEEP_ONLY (of sweep,parts,router), SWEEP_CASES, SWEEP_MODELS
# .whl (ignored; `bash benchmarks/device_wheels.sh [--mooncake]` fills it) holds py3.12 manylinux wheels of
# what the machine lacks (pyzmq, msgspec, starlette, uvicorn, redis, pytest and their needs; with --mooncake
# mooncake-transfer-engine-cuda13, and in .whl/debs the .debs of its verbs / netlink libraries).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/debs; for deb in .whl/debs/*.deb; do dpkg -x "$deb" /tmp/debs; done 2>/dev/null  # Mooncake's verbs / netlink libraries
cudart=$(dirname "$(find /opt /usr/local -name 'libcudart.so.13*' 2>/dev/null | head -1)")
export LD_LIBRARY_PATH=/tmp/debs/usr/lib/x86_64-linux-gnu:$cudart${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
nvidia-smi -L
model=/tmp/pdpipe-models/llama-8b-shape  # what launch/gpu-8b-*.toml serve: Llama-3.1-8B shapes, dummy weights
[ -f $model/config.json ] || python3 -m pdpipe.cli make-model $model --arch llama --layers 32 --hidden 4096 \
  --heads 32 --kv-heads 8 --intermediate 14336 --vocab 128256 --max-position 131072 --dtype bfloat16 --no-weights >/dev/null
sed -e 's/^name = "1p1d"/name = "1p1d-always"/' -e 's/^disaggregation = .*/disaggregation = "always"/' \
  -e 's/^decode_busy_ms = .*/decode_busy_ms = 0/' launch/gpu-8b-1p1d.toml > /tmp/gpu-8b-1p1d-always.toml
sed -e 's/^name = "1p1d"/name = "1p1d-backlog"/' -e 's/^disaggregation = .*/&\nlocal_on_backlog = true/' \
  launch/gpu-8b-1p1d.toml > /tmp/gpu-8b-1p1d-backlog.toml
sed -e 's/^name = "1p1d"/name = "1p1d-busy"/' -e "s/^decode_busy_ms = .*/decode_busy_ms = ${BUSY_MS:-12}/" \
  launch/gpu-8b-1p1d.toml > /tmp/gpu-8b-1p1d-busy.toml
sed -e 's/^name = "1p1d"/name = "1p1d-nobusy"/' -e 's/^decode_busy_ms = .*/decode_busy_ms = 0/' \
  launch/gpu-8b-1p1d.toml > /tmp/gpu-8b-1p1d-nobusy.toml
layout_config() { case "$1" in 1p1d-always|1p1d-backlog|1p1d-busy|1p1d-nobusy) echo /tmp/gpu-8b-$1.toml ;;
                  *) echo launch/gpu-8b-$1.toml ;; esac; }
ernie=/tmp/pdpipe-models/ernie-21b-a3b-shape  # launch/gpu-ernie21b-*.toml's folder, as benchmarks/moe_bench.py makes it
make_ernie() { [ -f $ernie/config.json ] || python3 -m pdpipe.cli make-model $ernie --arch ernie4_5_moe --layers 28 \
  --hidden 2560 --heads 20 --kv-heads 4 --head-dim 128 --intermediate 12288 --moe-intermediate 1536 --experts 64 \
  --top-k 6 --shared-experts 2 --vocab 103424 --max-position 131072 --dtype bfloat16 --no-weights >/dev/null; }
big=/tmp/pdpipe-models/llama-70b-shape  # launch/gpu-70b-*.toml's folder
make_70b() { [ -f $big/config.json ] || python3 -m pdpipe.cli make-model $big --arch llama --layers 80 --hidden 8192 \
  --heads 64 --kv-heads 8 --intermediate 28672 --vocab 128256 --max-position 131072 --dtype bfloat16 --no-weights >/dev/null; }
clear_gpus() {  # a step cut off by its timeout may leave rank processes on the GPUs, slowing what runs next
  local pids; pids=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | tr -d ' ')
  [ -n "$pids" ] && { echo "killing leftover GPU processes: $pids" | tee -a "$OUT/leftovers.log"; kill -9 $pids
                  for pid in $pids; do while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done; done; }
  return 0; }
while [ $# -gt 0 ]; do
  clear_gpus
  case "$1" in
    tests) timeout -s INT ${TESTS_S:-360} python3 -m pytest -m gpu ${TESTS_PATHS:-tests/gpu} -v -rfEs --tb=short -p no:cacheprovider --timeout ${TESTS_T:-120} ${TESTS_K:+-k "$TESTS_K"} ${TESTS_N:+-n $TESTS_N} 2>&1 \
             | tee -a "$OUT/gpu_tests.log" | tail -40
           tar czf "$OUT/pipeline_logs.tgz" /tmp/pdp-*/logs 2>/dev/null; shift ;;
    bench) timeout ${BENCH_S:-540} python3 benchmarks/gpu_bench.py --only "$2" 2>&1 | tee "$OUT/bench_${2//,/_}.log" | tail -80
           tar czf "$OUT/bench_logs.tgz" /tmp/pdb-*/logs 2>/dev/null; shift 2 ;;
    probe) python3 benchmarks/probes/gil_probe.py 2>&1 | tee "$OUT/gil_probe.log"; shift ;;
    int4layouts) timeout ${QUANT_S:-400} python3 benchmarks/probes/int4_layouts.py ${QUANT_ARGS:-} --json "$OUT/int4_layouts.json" \
           2>&1 | grep -v Warn | tee "$OUT/int4_layouts.log" | tail -20; shift ;;
    autotunecache) timeout ${CACHE_S:-400} python3 benchmarks/probes/autotune_cache.py ${CACHE_ARGS:-} --json "$OUT/autotune_cache.json" \
           2>&1 | grep -v Warn | tee "$OUT/autotune_cache.log" | tail -20; shift ;;
    lengths) python3 benchmarks/probes/new_length_probe.py 2>&1 | grep -v Warn | tee "$OUT/new_length_probe.log" | head -60; shift ;;
    prefill) timeout ${PREFILL_S:-240} python3 benchmarks/prefill_service.py --input-len "$2" --prompts "$3" \
               --out "$OUT/prefill_${2/:/-}.json" 2>&1 | tail -3; shift 3 ;;
    compare) configs=(); for l in ${LAYOUTS:-1p1d 1p1d-always 2mixed}; do configs+=("$(layout_config $l)"); done
             timeout ${COMPARE_S:-560} python3 -m pdpipe.cli bench compare "${configs[@]}" --input-len "$3" \
               --output-len "$4" --request-rates "$5" --num-prompts ${PROMPTS:-150} --vocab-size 128000 \
               --ignore-eos --slo ${SLO:-ttft:600 tpot:15} --out /tmp/compare_$2 2>&1 | tee "$OUT/compare_$2.log" | tail -40
             tar czf "$OUT/compare_$2.tgz" -C /tmp compare_$2 $(ls -d /tmp/pdpipe-1p1d* /tmp/pdpipe-2mixed 2>/dev/null | sed 's|/tmp/||'); shift 5 ;;
    tp4) make_70b  # four GPUs: KV between TP2/TP1 instances on separate GPUs; 1P(TP2)+1D(TP2) against 2x mixed TP2
         timeout ${BENCH_S:-300} python3 benchmarks/gpu_bench.py --only tpcopy --json "$OUT/tpcopy4.json" 2>&1 \
           | tail -20 > "$OUT/tpcopy4.log"
         timeout ${COMPARE_S:-560} python3 -m pdpipe.cli bench compare launch/gpu-70b-1p1d-tp2.toml \
           launch/gpu-70b-2mixed-tp2.toml --input-len 1024:3072 --output-len 128:512 --request-rates ${TP4_RATES:-1,2,4} \
           --num-prompts ${PROMPTS:-60} --vocab-size 128000 --ignore-eos --slo ${SLO:-ttft:1000 tpot:40} \
           --out /tmp/compare_tp4 2>&1 | tee "$OUT/compare_tp4.log" | tail -14
         tar czf "$OUT/compare_tp4.tgz" -C /tmp compare_tp4 2>/dev/null; shift ;;
    tp70b) make_70b
           timeout ${TP_S:-300} python3 benchmarks/tp_bench.py --model $big --json "$OUT/tp_bench.json" 2>&1 \
             | grep -v Warn | tee "$OUT/tp_bench.log" | tail -12
           timeout ${SERVE_S:-300} python3 -m pdpipe.cli bench compare launch/gpu-70b-tp2.toml --input-len 1024 \
             --output-len 64 --request-rates ${TP_RATES:-1,4} --num-prompts ${TP_PROMPTS:-16} --vocab-size 128000 \
             --ignore-eos --out /tmp/compare_70b 2>&1 | tee "$OUT/serve_70b.log" | tail -12
           tar czf "$OUT/serve_70b.tgz" -C /tmp compare_70b pdpipe-70b-tp2 2>/dev/null; shift ;;
    moesweep) timeout ${SWEEP_S:-300} python3 benchmarks/moe_kernel_sweep.py --json "$OUT/moe_sweep.json" ${SWEEP_ONLY:+--only $SWEEP_ONLY} ${SWEEP_CASES:+--cases $SWEEP_CASES} ${SWEEP_MODELS:+--models $SWEEP_MODELS} 2>&1 \
                | grep -v Warn | tee "$OUT/moe_sweep.log" | tail -40; shift ;;
    ep2|dp2) make_ernie  # dp2: the same with data-parallel attention
         flags="--expert-parallel"; [ "$1" = dp2 ] && flags="$flags --data-parallel-attention"
         timeout ${EP_S:-240} python3 benchmarks/tp_bench.py --model $ernie $flags --json "$OUT/$1_bench.json" \
           2>&1 | grep -v Warn | tee "$OUT/$1_bench.log" | tail -6; shift ;;
    moe|moebench|moecompare) [ "$1" = moecompare ] && make_ernie || timeout ${MOE_S:-300} python3 benchmarks/moe_bench.py ${MOE_ARGS:-} --json "$OUT/moe_bench.json" 2>&1 | grep -v Warn \
           | tee "$OUT/moe_bench.log" | tail -10
         [ "$1" = moebench ] && { shift; continue; }  # moecompare: the compare alone
         moe_configs=(); for l in ${MOE_LAYOUTS:-1p1d 2mixed}; do moe_configs+=("launch/gpu-ernie21b-$l.toml"); done
         timeout ${COMPARE_S:-400} python3 -m pdpipe.cli bench compare "${moe_configs[@]}" --input-len 1024:3072 --output-len 128:384 --request-rates ${MOE_RATES:-4,8,14} \
           --num-prompts ${PROMPTS:-100} --vocab-size 103000 --ignore-eos --slo ${SLO:-ttft:600 tpot:15} \
           --out /tmp/compare_moe 2>&1 | tee "$OUT/compare_moe.log" | tail -14
         tar czf "$OUT/compare_moe.tgz" -C /tmp compare_moe 2>/dev/null; shift ;;
    prefixcache) [ -f $model/config.json ] || python3 -m pdpipe.cli make-model $model --arch llama --layers 32 --hidden 4096 \
           --heads 32 --kv-heads 8 --intermediate 14336 --vocab 128256 --max-position 131072 --dtype bfloat16 --no-weights >/dev/null
         timeout ${PREFIX_S:-540} python3 benchmarks/prefix_cache.py --config ${PREFIX_CONFIG:-launch/gpu-8b-mixed.toml} \
           --vocab 128000 ${PREFIX_ARGS:---sessions 16 --groups 2 --turns 4 --system 1000 --user 100:200 --reply 128:256 --rate 1} \
           --result-file "$OUT/prefix_cache.json" 2>&1 | grep -v Warn | tee "$OUT/prefix_cache.log" | tail -8
         tar czf "$OUT/prefix_cache_logs.tgz" -C /tmp $(cd /tmp && ls -d pdpipe-prefix-cache-* 2>/dev/null); shift ;;
    prefixcompare) [ -f $model/config.json ] || python3 -m pdpipe.cli make-model $model --arch llama --layers 32 --hidden 4096 \
           --heads 32 --kv-heads 8 --intermediate 14336 --vocab 128256 --max-position 131072 --dtype bfloat16 --no-weights >/dev/null
         sed -e 's/^name = .*/name = "mixed-8b-nocache"/' -e 's/^kv_cache_mb = .*/&\nprefix_caching = false/' \
           launch/gpu-8b-mixed.toml > /tmp/gpu-8b-mixed-nocache.toml
         timeout ${COMPARE_S:-400} python3 -m pdpipe.cli bench compare launch/gpu-8b-mixed.toml /tmp/gpu-8b-mixed-nocache.toml \
           --dataset multi-turn --num-prompts ${PROMPTS:-16} --turns ${TURNS:-6} --num-prefixes 4 --prefix-len 1000 \
           --input-len 100:200 --output-len 128:256 --think-time 1 --request-rates ${RATES:-4,12} --vocab-size 128000 \
           --ignore-eos --slo ${SLO:-ttft:600 tpot:15} --out /tmp/compare_prefix 2>&1 | tee "$OUT/compare_prefix.log" | tail -14
         tar czf "$OUT/compare_prefix.tgz" -C /tmp compare_prefix 2>/dev/null; shift ;;
    w8a8) sed -e 's/^name = .*/name = "8b-fp8-weightonly"/' -e 's/^load_format = .*/&\nquantization = "fp8"/' \
           launch/gpu-8b-mixed.toml > /tmp/gpu-8b-fp8-weightonly.toml  # the 8B shape in fp8, served: W8A8 prompts against weight-only
         sed -e 's/^name = .*/name = "8b-fp8-w8a8"/' -e 's/^quantization = .*/&\nactivation_quantization = "fp8"/' \
           /tmp/gpu-8b-fp8-weightonly.toml > /tmp/gpu-8b-fp8-w8a8.toml
         timeout ${COMPARE_S:-560} python3 -m pdpipe.cli bench compare /tmp/gpu-8b-fp8-w8a8.toml /tmp/gpu-8b-fp8-weightonly.toml \
           --input-len ${W8A8_INPUT:-1024:4096} --output-len ${W8A8_OUTPUT:-32:64} --request-rates ${W8A8_RATES:-4,8,12} \
           --num-prompts ${PROMPTS:-80} --vocab-size 128000 --ignore-eos --slo ${SLO:-ttft:600 tpot:15} \
           --out /tmp/compare_w8a8 2>&1 | tee "$OUT/compare_w8a8.log" | tail -14
         tar czf "$OUT/compare_w8a8.tgz" -C /tmp compare_w8a8 pdpipe-8b-fp8-w8a8/logs pdpipe-8b-fp8-weightonly/logs 2>/dev/null
         shift ;;
    quant70b) make_70b  # the 70B shape in int4 on ONE GPU, served through the API under load
         timeout ${COMPARE_S:-560} python3 -m pdpipe.cli bench compare launch/gpu-70b-wint4.toml --input-len 512:2048 \
           --output-len 128:256 --request-rates ${Q70_RATES:-0.5,1,2} --num-prompts ${PROMPTS:-24} --vocab-size 128000 \
           --ignore-eos --slo ${SLO:-ttft:2000 tpot:40} --out /tmp/compare_70b_wint4 2>&1 | tee "$OUT/compare_70b_wint4.log" | tail -14
         tar czf "$OUT/compare_70b_wint4.tgz" -C /tmp compare_70b_wint4 2>/dev/null; shift ;;
    ernie300b) timeout ${E300_S:-400} python3 benchmarks/moe_bench.py --models ernie300b --layers ${E300_LAYERS:-16} \
           --quantization ${E300_QUANT:-wint4} --json "$OUT/ernie300b.json" 2>&1 | grep -v Warn | tee "$OUT/ernie300b.log" | tail -8
         shift ;;
    quantkernels) timeout ${QUANT_S:-400} python3 benchmarks/quant_kernels.py --only ${QUANT_ONLY:-gemm,moe} ${QUANT_ARGS:-} --json "$OUT/quant_kernels.json" 2>&1 \
           | tee "$OUT/quant_kernels.log" | tail -40; shift ;;
    samespeed) old=$(realpath "$2")  # a tree of an earlier commit (git archive), its kernels at the top in layouts before pdpipe/kernels
         [ -d "$old/kernels" ] && [ ! -e "$old/pdpipe/kernels" ] && ln -sfn ../kernels "$old/pdpipe/kernels"
         for i in 1 2; do
           (cd "$old" && PYTHONPATH=$old:/tmp/site timeout ${SAME_S:-240} python3 benchmarks/gpu_bench.py --only decode,prefill \
              --json "$OUT/samespeed_old_$i.json" 2>&1 | tail -2); clear_gpus
           timeout ${SAME_S:-240} python3 benchmarks/gpu_bench.py --only decode,prefill --json "$OUT/samespeed_new_$i.json" 2>&1 | tail -2
           clear_gpus
         done
         python3 benchmarks/same_speed.py --old "$OUT"/samespeed_old_*.json --new "$OUT"/samespeed_new_*.json \
           --json "$OUT/samespeed.json" 2>&1 | tee "$OUT/samespeed.log"; shift 2 ;;
    *) echo "unknown step $1"; exit 2 ;;
  esac
done
