#!/usr/bin/env bash
# The one command a session with a borrowed CUDA GPU runs first (15 minutes of device time in
# all, the machine's start included; one command at most 10 minutes: --budget 540 by default).
#
#   bash tests/gpu_check.sh [--out FILE] [--work DIR] [--budget SECONDS] [--dry-run]
#
# The first time: run it as is from the checkout root, with the machine's python that has torch
# and triton (--python). It never imports the checkout: it installs a copy of the sources with
# pip install --no-deps --no-build-isolation --no-index --target <work>/site (no package index)
# and runs everything from <work> with python -P. Steps, each under `timeout`, each risky group
# in its own process (a crash that poisons the CUDA context cannot hide the others):
#   1. install;
#   2. the CUDA test groups (pytest; JUnit XML in the work folder);
#   3. compute-sanitizer memcheck on one forward per dtype (tests/gates/gpu_forward.py; a
#      training step too in fp16 and bf16), where the tool exists;
#   4. the GPU latency table: pytest bench/test_bench_gpu.py --benchmark-json=<work>/gpu.json;
#   5. its rows (python bench/report.py add) to <work>/results.jsonl, or to --out FILE
#      (--out bench/results.jsonl appends them to the tracked results file).
# Exit status: 0 all passed, 1 something failed, 2 bad usage, 3 no CUDA device.
set -uo pipefail

usage() {
  cat <<'USAGE'
usage: bash tests/gpu_check.sh [options]

  --out FILE       append the benchmark's rows here (default: <work>/results.jsonl; give
                   bench/results.jsonl to add them to the tracked results file)
  --work DIR       the work folder: install, logs, JUnit XML, JSON (default: a temporary one)
  --shared DIR     weights and images (default: $CAMIXER_FAST_SHARED, else ../shared)
  --python EXE     the interpreter with the machine's torch and triton (default: python3)
  --budget SECONDS stop starting steps when this much time has passed (default 540)
  --skip-tests | --skip-sanitizer | --skip-bench
  --dry-run        print the plan and exit (no GPU needed)
  -h, --help       this text
USAGE
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SHARED="${CAMIXER_FAST_SHARED:-}" PY="python3" WORK="" OUT="" BUDGET=540
RUN_TESTS=1 RUN_SANITIZER=1 RUN_BENCH=1 DRY_RUN=0

need_value() {
  if [ $# -lt 2 ] || [ -z "$2" ]; then echo "error: $1 needs a value" >&2; usage >&2; exit 2; fi
}

while [ $# -gt 0 ]; do
  case "$1" in
    --out) need_value "$@"; OUT="$2"; shift 2 ;;
    --work) need_value "$@"; WORK="$2"; shift 2 ;;
    --shared) need_value "$@"; SHARED="$2"; shift 2 ;;
    --python) need_value "$@"; PY="$2"; shift 2 ;;
    --budget) need_value "$@"; BUDGET="$2"; shift 2 ;;
    --skip-tests) RUN_TESTS=0; shift ;;
    --skip-sanitizer) RUN_SANITIZER=0; shift ;;
    --skip-bench) RUN_BENCH=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done
case "$BUDGET" in
  ''|*[!0-9]*) echo "error: --budget needs whole seconds, got '$BUDGET'" >&2; exit 2 ;;
esac
DEADLINE=$(( $(date +%s) + BUDGET ))
[ -n "$SHARED" ] || SHARED="$REPO/../shared"

# name | timeout (s) | pytest arguments (relative to the checkout)
TEST_GROUPS=(
  "kernels|240|tests/test_kernels.py tests/test_block_kernels.py tests/test_odisr_triton.py"
  "golden|180|tests/test_golden.py"
  "training|180|tests/test_train.py -k triton"
  "api|180|tests/test_upscale.py tests/test_model.py tests/test_loading.py"
  "precision|180|tests/test_precision.py tests/test_autocast.py"
  "compile|240|tests/test_compile.py tests/test_graphs.py tests/test_host_sync.py"
)
DTYPES=(float32 float16 bfloat16)
BENCH_LIMIT=300

if [ "$DRY_RUN" = 1 ]; then
  echo "checkout: $REPO"
  echo "shared:   $SHARED"
  echo "python:   $PY"
  echo "budget:   $BUDGET s"
  echo "rows to:  ${OUT:-<work>/results.jsonl}"
  echo "plan:"
  echo "  install (180 s): pip install --no-deps --no-build-isolation --no-index --target <work>/site"
  if [ "$RUN_TESTS" = 1 ]; then
    for group in "${TEST_GROUPS[@]}"; do
      IFS='|' read -r name limit args <<<"$group"
      echo "  tests-$name ($limit s): pytest $args"
    done
  fi
  if [ "$RUN_SANITIZER" = 1 ]; then
    for dtype in "${DTYPES[@]}"; do
      echo "  sanitizer-$dtype (120 s): compute-sanitizer memcheck tests/gates/gpu_forward.py --dtype $dtype"
    done
  fi
  if [ "$RUN_BENCH" = 1 ]; then
    echo "  bench ($BENCH_LIMIT s): pytest bench/test_bench_gpu.py --benchmark-json=<work>/gpu.json"
    echo "  rows: bench/report.py add <work>/gpu.json --out ${OUT:-<work>/results.jsonl}"
  fi
  exit 0
fi

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "error: no CUDA device visible to $PY (torch.cuda.is_available() is False)" >&2
  exit 3
fi

P="$("$PY" -c 'import sys; print("-P" if sys.version_info >= (3, 11) else "")')"
[ -n "$WORK" ] || WORK="$(mktemp -d -t camixer-gpu-check.XXXXXX)"
mkdir -p "$WORK" && WORK="$(cd "$WORK" && pwd)"
[ -n "$OUT" ] || OUT="$WORK/results.jsonl"
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
: >"$WORK/steps.tsv"
export CAMIXER_FAST_SHARED="$SHARED" TRITON_CACHE_DIR="$WORK/triton-cache" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
cd "$WORK"              # never the checkout: its camixer_fast/ would shadow the installed one

# step NAME LIMIT COMMAND...: run within min(LIMIT, time left), log to <work>/NAME.log
step() {
  local name="$1" limit="$2" start code status left
  shift 2
  start=$(date +%s)
  left=$(( DEADLINE - start ))
  if [ "$left" -lt 15 ]; then
    printf '%s\tout-of-time\t0\n' "$name" >>"$WORK/steps.tsv"; return 1
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== $name (at most $limit s)" >&2
  timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
  code=$?
  case $code in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
  printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - start ))" >>"$WORK/steps.tsv"
  echo "   $status (exit $code)" >&2
  return $code
}

rm -rf "$WORK/src" && mkdir -p "$WORK/src"
cp -r "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/camixer_fast" "$REPO/kernels" \
  "$REPO/reference" "$WORK/src/"
if ! step install 180 "$PY" -m pip install --no-deps --no-build-isolation --no-index --quiet \
    --target "$WORK/site" "$WORK/src"; then
  tail -20 "$WORK/install.log" >&2; exit 1
fi
export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"

if [ "$RUN_TESTS" = 1 ]; then
  for group in "${TEST_GROUPS[@]}"; do
    IFS='|' read -r name limit args <<<"$group"
    paths=()
    for arg in $args; do
      case "$arg" in tests/*) paths+=("$REPO/$arg") ;; *) paths+=("$arg") ;; esac
    done
    step "tests-$name" "$limit" "$PY" $P -m pytest "${paths[@]}" -p no:cacheprovider -q \
      --junitxml="$WORK/tests-$name.xml" || true
  done
fi

if [ "$RUN_SANITIZER" = 1 ]; then
  SANITIZER="$(command -v compute-sanitizer || true)"
  [ -z "$SANITIZER" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && \
    SANITIZER=/usr/local/cuda/bin/compute-sanitizer
  if [ -z "$SANITIZER" ]; then
    printf 'sanitizer\tunavailable\t0\n' >>"$WORK/steps.tsv"
  else
    for dtype in "${DTYPES[@]}"; do
      train=""; [ "$dtype" = float32 ] || train="--train"
      step "sanitizer-$dtype" 120 "$SANITIZER" --tool memcheck --error-exitcode 99 \
        --print-limit 20 "$PY" $P "$REPO/tests/gates/gpu_forward.py" --dtype "$dtype" $train || true
    done
  fi
fi

if [ "$RUN_BENCH" = 1 ]; then
  step bench "$BENCH_LIMIT" "$PY" $P -m pytest "$REPO/bench/test_bench_gpu.py" -p no:cacheprovider \
    -q --benchmark-json="$WORK/gpu.json" || true
  if [ -f "$WORK/gpu.json" ]; then
    step rows 60 "$PY" "$REPO/bench/report.py" add "$WORK/gpu.json" --out "$OUT" || true
  fi
fi

echo "steps (name, status, seconds):" >&2
cat "$WORK/steps.tsv" >&2
echo "work folder (logs): $WORK; rows: $OUT" >&2
grep -qE $'\t(failed|timeout|out-of-time)\t' "$WORK/steps.tsv" && exit 1
exit 0
