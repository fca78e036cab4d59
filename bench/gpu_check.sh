#!/usr/bin/env bash
# The whole GPU check in one call, for a machine with a CUDA GPU and torch, triton, timm and
# pytest-benchmark already installed (no network needed): the GPU tests with compiled Triton
# kernels, then the timed benchmark study. It records: results land in the committed
# bench/results/<device>/ (--bench-record; a plain timed run writes bench/results-local/) and are
# copied to $OUT when it is set, as on the project's device machines; the short table comes last.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
python -c "import torch, triton, timm; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, timm {timm.__version__}'); print(torch.cuda.get_device_name())" || exit 1

LOGS="${OUT:-$(mktemp -d)}"; mkdir -p "$LOGS"; echo "full logs: $LOGS"
status=0
echo "== GPU tests (compiled kernels) =="
python -m pytest tests -m gpu -q -p no:cacheprovider -rs 2>&1 | tee "$LOGS/gpu-tests.log" | tail -25; [ "${PIPESTATUS[0]}" = 0 ] || status=1
echo "== timed benchmark study =="
python -m pytest bench --benchmark --bench-record -q -p no:cacheprovider --benchmark-columns=median,rounds 2>&1 | tee "$LOGS/bench.log" | tail -40; [ "${PIPESTATUS[0]}" = 0 ] || status=1

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/bench-results" && cp -r bench/results/cuda-* "$OUT/bench-results/" 2>/dev/null
fi
echo
for f in bench/results/cuda-*/summary.md; do [ -f "$f" ] && cat "$f"; done
exit $status
