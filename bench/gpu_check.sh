#!/usr/bin/env bash
# The whole GPU check in one call, for a machine with a CUDA GPU and torch, triton, timm and
# pytest-benchmark already installed (no network needed). Every stage has its own time limit so
# the whole check ends in under 9 minutes on an H200 (the device window is 15 minutes, starts
# included); a stage cut by its limit keeps what it wrote (partial benchmark runs merge).
#   1. GPU tests with compiled Triton kernels (capture + replay == eager per attention backend, ...)
#   2. bench_captured.py: whole forwards, host time and device time apart (docs/design.md section 9)
#   3. bench_profile.py: where one packed forward spends its time (profile_packed.txt)
#   4. the rest of the timed study, as long as the budget lasts (15 s: it gave 45 s to stage 6)
#   5. bench/high_res.py: ViT-B/L at 384/512 px and the tokenizer at 1024 px, MSViT with the entropy
#      gate at two and three scales (high_res.md; the token table is CPU work, in the CPU results)
#   6. bench/export_check.py: msvit.export on CUDA (AOTInductor), two packages (the torch path and
#      kernels="triton", the fused kernels as triton_ops) each run in a process without msvit, their
#      logits and time per call against the eager model's (docs/design.md section 14). Limit 85 s:
#      two AOTInductor compiles (it was 45 s for one); the limits add up to 540 s
# It records: results land in the committed bench/results/<device>/ (--bench-record) and are copied
# to $OUT when it is set, as on the project's device machines; the short table comes last.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
python -c "import torch, triton, timm; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, timm {timm.__version__}'); print(torch.cuda.get_device_name())" || exit 1
python -c "import torch; print('cuDNN', torch.backends.cudnn.version())"

LOGS="${OUT:-$(mktemp -d)}"; mkdir -p "$LOGS"; echo "full logs: $LOGS"
status=0
BENCH=(python -m pytest -q -p no:cacheprovider --benchmark --bench-record --benchmark-columns=median,rounds)
stage() {  # stage NAME SECONDS COMMAND...: run with a limit, keep its log, show its tail
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s) =="
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  tail -25 "$LOGS/$name.log"
  [ "$rc" = 124 ] && echo "!! $name stopped at its ${limit}s limit"
  [ "$rc" = 0 ] || status=1
}
stage gpu-tests 140 python -m pytest tests -m gpu -q -p no:cacheprovider -rs
stage captured 150 "${BENCH[@]}" bench/bench_captured.py
stage profile 40 "${BENCH[@]}" bench/bench_profile.py
stage study 15 "${BENCH[@]}" bench --deselect bench/bench_captured.py --deselect bench/bench_profile.py --deselect bench/bench_host.py
stage high-res 70 python bench/high_res.py --record --parts tokenizer latency
stage native 40 python bench/native_resolution.py --record --device cuda --repeats 5  # untested on a GPU so far
stage export 85 python bench/export_check.py --device cuda --kernels reference,triton

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/bench-results" && cp -r bench/results/cuda-* "$OUT/bench-results/" 2>/dev/null
fi
echo
for f in bench/results/cuda-*/summary.md bench/results/cuda-*/captured_summary.md; do [ -f "$f" ] && cat "$f"; done
for f in bench/results/cuda-*/high_res.md; do [ -f "$f" ] && sed -n '/^## Headline/,/^## What/p' "$f"; done
exit $status
