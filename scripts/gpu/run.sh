#!/usr/bin/env bash
# Runs retro's GPU tests and benchmarks in one go on a bare GPU host where the vLLM
# bundle is staged (../shared/gpu/README.md): carry .gpu-bundle/ (stage.sh and the
# parts not yet staged). Results and logs go to $OUT (default /tmp/retro-gpu-out).
#
#   STAGES="kernels engine kbench throughput" bash scripts/gpu/run.sh
#
# Stages: ncusrc (Nsight Compute per-instruction profiles exported as text; NCUSRC),
# kernels (kernel tests on the GPU; KERNEL_TESTS picks files), kbench (decode attention per layer vs
# FA3), ibuild (index build of one long prompt, profiled; IBUILD_ARGS), sweep
# (launch parameters of the decode kernels, SWEEP_ARGS), engine (vLLM engine tests
# under vLLM's defaults; ENGINE_ARGS, e.g. -s; ENGINE_K a -k expression), tp (tensor parallelism
# on two GPUs through the mp and Ray executors, on a multi-GPU kind; the Ray executor on one
# GPU anywhere), wavebuf (the wave buffer's
# host mirror, cluster cache and vLLM block release tests: pinned memory and zero-copy copies on the GPU,
# RetroSpec under vLLM 0.26), pagecopy (misses of the cluster cache over PCIe:
# zero-copy Triton reads vs host gather + copy engine; PAGECOPY_ARGS), smollm2 (SmolLM2 through
# vLLM, retro vs dense; needs the .gpu-carry/ parts of scripts/gpu/prepare_carry.sh,
# carried one per call like the bundle), ncu (Nsight Compute profile of one decode
# step's kernels, NCU_CASE), throughput (benchmarks/decode_throughput.py,
# THROUGHPUT_ARGS passed through), long / longwait (the 1M-token request of
# benchmarks/long_context.py, LONG_ARGS, detached: it spans several calls), taskacc
# (RULER-style task accuracy through vLLM, retro vs FlashAttention, TASKACC_ARGS;
# needs the SmolLM2 parts as smollm2).
#
# BUILD_EXT=1 installs the project with its extension vllm_retro._C built with CUDA
# (csrc/cuda, sm_90; a few minutes, log in $OUT/build_ext.log) instead of the
# Python-only install, and copies the built library to $OUT to carry back. It is
# rebuilt when csrc/ or setup.py changed since (or REINSTALL=1). With it, the sweep's
# "score cuda" and "attend cuda" variants and the CUDA-vs-Triton tests run, and
# RETRO_DECODE_SCORE_IMPL=cuda / RETRO_DECODE_ATTEND_IMPL=cuda switch the engine's
# score / attention stage to CUDA.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/retro-gpu-out}
mkdir -p "$OUT"
STAGES=${STAGES:-"kernels kbench engine throughput"}
bash .gpu-bundle/stage.sh || exit $?
export PYTHONPATH=/opt/vllm-site:${PYTHONPATH:-}
export VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  VLLM_NO_USAGE_STATS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# NVLink multicast stays off on the shared multi-GPU hosts (their notes): kept set
# for every process vLLM or Ray starts.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# The Triton decode path needs no compiled extension; the entry point (vLLM finds
# the plugin through it) needs an install.
if [ "${BUILD_EXT:-0}" = 1 ]; then
  stamp=$(cat setup.py csrc/*.* csrc/cuda/*.* | sha1sum | cut -c1-16)
  if [ ! -f /tmp/proj-site/.retro-ext-stamp ] && ls vllm_retro/_C*.so >/dev/null 2>&1 \
      && [ "$(cat vllm_retro/.retro-ext-stamp 2>/dev/null)" = "$stamp" ]; then
    # A library built by an earlier call from the same sources, carried back
    # (vllm_retro/_C*.so + vllm_retro/.retro-ext-stamp): a Python-only install.
    echo "=== using the carried vllm_retro._C (stamp $stamp)"
    rm -rf /tmp/proj-site
    RETRO_NO_EXTENSION=1 python3 -m pip install -q --no-build-isolation --no-deps \
      --no-index --target /tmp/proj-site . 2>&1 | tail -3
    cp vllm_retro/_C*.so /tmp/proj-site/vllm_retro/
    echo "$stamp" > /tmp/proj-site/.retro-ext-stamp
  fi
  if ! ls /tmp/proj-site/vllm_retro/_C*.so >/dev/null 2>&1 || [ "${REINSTALL:-0}" = 1 ] \
      || [ "$(cat /tmp/proj-site/.retro-ext-stamp 2>/dev/null)" != "$stamp" ]; then
    rm -rf /tmp/proj-site
    echo "=== building vllm_retro._C with CUDA ($(date +%T))"
    RETRO_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 -m pip install \
      --no-build-isolation --no-deps --no-index --target /tmp/proj-site . \
      > "$OUT/build_ext.log" 2>&1
    r=$?
    tail -5 "$OUT/build_ext.log"
    [ "$r" = 0 ] || { echo "extension build failed ($r): $OUT/build_ext.log"; exit 4; }
    echo "$stamp" > /tmp/proj-site/.retro-ext-stamp
  fi
  # The installed Python files are those of the call that built the library: a
  # later call on the same machine with the same C++ but changed Python refreshes them.
  find vllm_retro -name '*.py' -exec cp --parents {} /tmp/proj-site/ \;
  cp /tmp/proj-site/vllm_retro/_C*.so "$OUT/"
  echo "$stamp" > "$OUT/retro-ext-stamp"
  # Tests and benchmarks run from the root import vllm_retro from this tree: put the
  # library beside its sources too (ignored by git).
  cp /tmp/proj-site/vllm_retro/_C*.so vllm_retro/
else
  # The engine imports the installed package (its entry point is how vLLM finds the
  # plugin), the tests and benchmarks the tree: reinstall whenever the package's
  # sources differ from the installed ones, or the engine runs stale code.
  stamp=$(find vllm_retro setup.py -name '*.py' -type f | sort | xargs cat | sha1sum | cut -c1-16)
  if [ ! -d /tmp/proj-site/vllm_retro ] || [ "${REINSTALL:-0}" = 1 ] \
      || [ "$(cat /tmp/proj-site/.retro-py-stamp 2>/dev/null)" != "$stamp" ]; then
    rm -rf /tmp/proj-site
    RETRO_NO_EXTENSION=1 python3 -m pip install -q --no-build-isolation --no-deps \
      --no-index --target /tmp/proj-site . 2>&1 | tail -3
    echo "$stamp" > /tmp/proj-site/.retro-py-stamp
  fi
fi
export PYTHONPATH=/tmp/proj-site:$PYTHONPATH
# Carried extras (.gpu-carry/) are kept under /opt/retro-carry across calls.
mkdir -p /opt/retro-carry
cp -n .gpu-carry/* /opt/retro-carry/ 2>/dev/null || true
python3 -c "import torch, triton, vllm; print('torch', torch.__version__, 'triton', triton.__version__, 'vllm', vllm.__version__, torch.cuda.get_device_name())"
if [ "${BUILD_EXT:-0}" = 1 ]; then
  python3 -c "from vllm_retro.kernels import triton_decode as td; print('vllm_retro._C CUDA kernels: score', td.cuda_score_available(), 'attend', td.cuda_attend_available())"
fi
# The SmolLM2 GGUF from its carried parts (.gpu-carry/, scripts/gpu/prepare_carry.sh)
# and the gguf reader transformers needs (stages smollm2 and taskacc).
smollm2_gguf() {
  local parts
  parts=$(ls /opt/retro-carry/part-smollm2-* 2>/dev/null | wc -l)
  if [ "$parts" -lt 3 ]; then echo "$s: $parts of 3 SmolLM2 GGUF parts carried"; return 1; fi
  cat /opt/retro-carry/part-smollm2-* > /opt/retro-carry/smollm2.gguf
  python3 -m pip install -q --no-index --no-deps --target /tmp/carry-site \
    /opt/retro-carry/gguf-*.whl
}
rc=0
for s in $STAGES; do
  echo "=== stage $s ($(date +%T))"
  case $s in
    kernels) python3 -m pytest -q -x ${KERNEL_TESTS:-tests/kernels} 2>&1 | tee "$OUT/kernels.log" | tail -15 ;;
    kbench) python3 benchmarks/decode_kernel_bench.py ${KBENCH_ARGS:-} \
              --out "$OUT/decode_kernel_h200.json" 2>&1 | tee "$OUT/kbench.log" | tail -20 ;;
    ibuild) python3 benchmarks/index_build_bench.py ${IBUILD_ARGS:-} \
              --out "$OUT/index_build_h200.json" 2>&1 | tee "$OUT/ibuild.log" | tail -20 ;;
    sweep) python3 benchmarks/decode_kernel_sweep.py ${SWEEP_ARGS:-} \
              --out "$OUT/decode_kernel_sweep_h200.json" 2>&1 | tee "$OUT/sweep.log" | tail -40 ;;
    # -p no:logging: vLLM's captured DEBUG records would bury the assertion in the tail.
    engine) python3 -m pytest -q -x -p no:logging tests/gpu/test_engine_gpu.py tests/gpu/test_per_kind_gpu.py ${ENGINE_ARGS:-} \
              ${ENGINE_K:+-k "$ENGINE_K"} \
              2>&1 | tee "$OUT/engine.log" | grep -v "^INFO\|^DEBUG\|^WARNING\|^(EngineCore" \
              | tail -40 ;;
    tp) python3 -m pytest -q -x -p no:logging tests/gpu/test_tp_gpu.py ${TP_ARGS:-} 2>&1 \
              | tee "$OUT/tp.log" | grep -v "^INFO\|^DEBUG\|^WARNING\|^(EngineCore\|^(Worker\|^(Ray" \
              | tail -40 ;;
    wavebuf) python3 -m pytest -q tests/memory tests/test_kv_spec.py tests/test_wave_buffer_manager.py 2>&1 \
              | tee "$OUT/wavebuf.log" | tail -25 ;;
    pagecopy) python3 benchmarks/page_copy_bench.py ${PAGECOPY_ARGS:-} \
              --out "$OUT/page_copy_h200.json" 2>&1 | tee "$OUT/pagecopy.log" | tail -10 ;;
    smollm2)
      smollm2_gguf || { rc=3; continue; }
      PYTHONPATH=/tmp/carry-site:$PYTHONPATH RETRO_SMOLLM2_GGUF=/opt/retro-carry/smollm2.gguf \
        python3 -m pytest -q -s -x tests/gpu/test_smollm2_gpu.py 2>&1 | tee "$OUT/smollm2.log" \
        | grep -v "^INFO\|^DEBUG\|^WARNING" | tail -25 ;;
    # RULER-style task accuracy through vLLM on the GPU (benchmarks/task_accuracy.py,
    # TASKACC_ARGS, e.g. --configs dense,retro,stack --extra-configs '{"stack": {...}}'),
    # SmolLM2 in bf16 from the carried GGUF (as the smollm2 stage).
    taskacc)
      smollm2_gguf || { rc=3; continue; }
      PYTHONPATH=/tmp/carry-site:$PYTHONPATH RETRO_SMOLLM2_GGUF=/opt/retro-carry/smollm2.gguf \
        python3 benchmarks/task_accuracy.py --dtype bfloat16 \
        --model-dir .cache/smollm2-135m-bf16 ${TASKACC_ARGS:-} \
        --out "$OUT/task_accuracy_h200.json" 2>&1 | tee "$OUT/taskacc.log" \
        | grep -v "^INFO\|^DEBUG\|^WARNING" | tail -40 ;;
    throughput) python3 benchmarks/decode_throughput.py ${THROUGHPUT_ARGS:-} \
              --out "$OUT/decode_throughput_h200.json" 2>&1 | tee "$OUT/throughput.log" \
              | grep -v "^INFO\|^WARNING\|^DEBUG" | tail -30 ;;
    # The 1M-token request (benchmarks/long_context.py, LONG_ARGS): ~10 minutes, more
    # than one device call. "long" starts it detached (setsid: it outlives the call
    # while the machine is held) writing under /tmp/retro-long; "longwait" waits up
    # to LONG_WAIT_S (default 540) for it, shows its progress and copies its JSON
    # and log to $OUT. Keep the calls back to back (the machine goes back when idle).
    long)
      mkdir -p /tmp/retro-long
      if [ -f /tmp/retro-long/pid ] && kill -0 "$(cat /tmp/retro-long/pid)" 2>/dev/null; then
        echo "long: already running (pid $(cat /tmp/retro-long/pid))"; continue
      fi
      setsid nohup python3 benchmarks/long_context.py ${LONG_ARGS:-} \
        --out /tmp/retro-long/long_context_h200.json > /tmp/retro-long/long.log 2>&1 &
      echo $! > /tmp/retro-long/pid
      echo "long: started (pid $!), log /tmp/retro-long/long.log"; continue ;;
    longwait)
      pid=$(cat /tmp/retro-long/pid 2>/dev/null)
      end=$(( $(date +%s) + ${LONG_WAIT_S:-540} ))
      while [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(date +%s)" -lt "$end" ]; do
        sleep 10
      done
      grep -v "^INFO\|^WARNING\|^DEBUG\|^(EngineCore" /tmp/retro-long/long.log | tail -25
      cp /tmp/retro-long/long.log "$OUT/" 2>/dev/null
      cp /tmp/retro-long/long_context_h200.json* "$OUT/" 2>/dev/null
      if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        echo "longwait: still running"; rc=5
      fi
      continue ;;
    # Nsight Compute on the default decode step (NCU_CASE, e.g. 131072x8): speed of
    # light, occupancy, warp stalls and memory of the five kernels' first launches.
    ncu)
      NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu \
            2>/dev/null | head -1)
      if [ -z "$NCU" ]; then echo "ncu: not found on this host"; rc=3; continue; fi
      "$NCU" --csv --page details --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section LaunchStats --section MemoryWorkloadAnalysis \
        --section InstructionStats \
        -k 'regex:_(score|key|cand|collect|attend)_kernel' -c 5 \
        python3 benchmarks/decode_kernel_sweep.py --cases ${NCU_CASE:-131072x8} \
        --variants default --out "$OUT/ncu_sweep.json" > "$OUT/ncu.csv" 2> "$OUT/ncu.err"
      r=$?; tail -3 "$OUT/ncu.err"; wc -l "$OUT/ncu.csv"
      python3 scripts/gpu/ncu_summary.py "$OUT/ncu.csv" || true
      [ "$r" = 0 ] || rc=$r; continue ;;
    # Nsight Compute, full set with per-instruction (SASS) counters, of single kernels,
    # exported as text so a machine without ncu can read them: NCUSRC lists
    # "name|kernel regex|sweep arguments" entries separated by "+"; reports carried
    # under .ncu/ are exported too.
    ncusrc)
      NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu \
            2>/dev/null | head -1)
      if [ -z "$NCU" ]; then echo "ncu: not found on this host"; rc=3; continue; fi
      IFS='+' read -ra specs <<< "${NCUSRC:-}"
      # Reports and exports under /tmp/ncusrc; one archive of the text comes back
      # ($OUT returns a limited number of files).
      NO=/tmp/ncusrc; rm -rf "$NO"; mkdir -p "$NO"
      for spec in "${specs[@]}"; do
        IFS='|' read -r nm rx sargs <<< "$spec"
        timeout 240 "$NCU" --set full --import-source yes -k "regex:$rx" --launch-skip 2 -c 1 \
          -o "$NO/$nm" python3 benchmarks/decode_kernel_sweep.py $sargs \
          --out "$NO/$nm.sweep.json" > "$NO/$nm.log" 2>&1
        echo "ncusrc $nm: rc=$?"
      done
      for rep in "$NO"/*.ncu-rep .ncu/*.ncu-rep; do
        [ -f "$rep" ] || continue
        b="$NO/$(basename "$rep" .ncu-rep)"
        "$NCU" --import "$rep" --page source --csv --print-source sass > "$b.sass.csv" 2> "$b.err"
        "$NCU" --import "$rep" --page details --print-details all > "$b.details.txt" 2>> "$b.err"
        echo "exported $(basename "$rep"): $(wc -l < "$b.sass.csv") SASS lines"
      done
      tar czf "$OUT/ncusrc_text.tar.gz" -C "$NO" --exclude='*.ncu-rep' .
      continue ;;
    *) echo "unknown stage $s"; rc=2 ;;
  esac
  r=${PIPESTATUS[0]}; [ "$r" = 0 ] || { echo "stage $s failed ($r)"; rc=$r; }
done
exit $rc
