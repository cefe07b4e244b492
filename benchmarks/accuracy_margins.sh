#!/usr/bin/env bash
# The spread that the accuracy tests' margins rest on (docs/testing.md, "Accuracy margins"): runs them
# over several train seeds (split, trained DigitsCNN, batch order, RNG), with ATen's kernels at the
# machine's best ISA and at its portable baseline (ATEN_CPU_CAPABILITY=default) side by side, and
# collects their "[figures]" lines in $OUT (default accuracy_figures.txt).
#
#   benchmarks/accuracy_margins.sh [SEEDS] [TESTS...]    e.g. benchmarks/accuracy_margins.sh 0,1,2
#
# One torch thread per test process, as in `make test`. The baseline run trains its own DigitsCNNs
# (a separate model cache), as a machine with other SIMD would.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${1:-0,1,2}
shift || true
TESTS=("$@")
if [ ${#TESTS[@]} -eq 0 ]; then
  TESTS=(tests/test_sparsity_training.py tests/test_quantization_accuracy.py tests/test_binarization_training.py
         tests/test_pruning_training.py
         "tests/test_mixed_precision.py::test_digits_hawq_is_at_least_as_accurate_as_uniform_and_order_violating_assignments")
fi
PY=${PY:-.venv/bin/python}
OUT=$(realpath -m "${OUT:-accuracy_figures.txt}")
CACHE=${FXCOMPRESS_CACHE:-$HOME/.cache/fxcompress}
run() {  # $1: ATEN_CPU_CAPABILITY (empty: the machine's best), $2: model cache
  local cap=(-u ATEN_CPU_CAPABILITY)
  [ -n "$1" ] && cap=(ATEN_CPU_CAPABILITY="$1")
  env "${cap[@]}" FXCOMPRESS_CACHE="$2" FXCOMPRESS_TEST_SEEDS="$SEEDS" FXCOMPRESS_FIGURES="$OUT" \
    "$PY" -m pytest -q -p no:cacheprovider -n 1 -k seed "${TESTS[@]}" | tail -3
}
run "" "$CACHE" &
run default "$CACHE/aten-default"
wait
grep '^\[figures\]' "$OUT" | sort
