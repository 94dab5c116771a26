#!/usr/bin/env bash
# One-command check of the project on a CUDA machine (issue 9), in a few minutes:
#
#   1. install the project with the machine's own torch and triton: pip install --no-deps
#      --no-build-isolation --no-index into a temporary folder (no package index needed);
#   2. run the CUDA test subset, one process per risky group (a crash that poisons the CUDA
#      context cannot hide the other groups), from outside the checkout with python -P so the
#      checkout's camixer_fast/ folder never shadows the installed package;
#   3. run the speed benchmark (bench/gpu_bench.py --quick, issue 11): the official op chain
#      against ours, S and B at 320x180 -> 1280x720, every gamma, every precision, per-kernel
#      roofline, batch, large image, training, upscale; every case checked before it is timed;
#      sections in their own processes, within the time left;
#   4. check and time the compiled and CUDA-graph variants (bench/gpu_compile_graphs.py
#      --quick, issue 11): torch.compile(fullgraph=True) of the Triton path against eager,
#      CUDAGraphModel replays against eager forwards (the benchmark's "variants");
#   5. run compute-sanitizer memcheck on one forward per dtype (and a training step in fp16 and
#      bf16, whose training kernels are unproven on a GPU), where the tool exists and works;
#   6. write gpu-<date>.json and gpu-<date>.md (bench/gpu_summary.py) into --out, the speed
#      targets' verdicts included (bench/gpu_report.py); with the default --out, also the GPU
#      section of bench/RESULTS.md.
#
# Every step has a time limit. Exit status: 0 all passed, 1 something failed, 2 bad usage,
# 3 no CUDA device.
set -uo pipefail

usage() {
  cat <<'EOF'
usage: bash bench/gpu_check.sh [options]

  --out DIR        where gpu-<date>.json and .md go (default: bench/results)
  --shared DIR     weights, golden outputs and images (default: $CAMIXER_FAST_SHARED,
                   else ../shared beside the checkout, else shared/ inside it)
  --python EXE     the interpreter with the machine's torch and triton (default: python3)
  --work DIR       keep the work folder (logs, JUnit XML) here (default: a temporary one)
  --full           the benchmark's full mode (more timed calls, longer limits) instead of
                   --quick
  --budget SECONDS stop starting steps when this much time has passed (default 540: the
                   whole check fits a 10-minute command); a step never outlives it
  --logs           also write the work folder's logs as gpu-logs-<date>.tar.gz into --out
  --skip-tests | --skip-sanitizer | --skip-bench | --skip-compile
  --dry-run        print the plan and exit (no GPU needed)
  -h, --help       this text
EOF
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$REPO/bench/results"
SHARED="${CAMIXER_FAST_SHARED:-}"
PY="python3"
WORK=""
BENCH_MODE="--quick"
COMPILE_MODE="--quick"
BENCH_LIMIT=420
# the benchmark's sections here: its "variants" come from the compile-graphs step
BENCH_SECTIONS="ceilings,latency,kernels,batch,large,training,upscale"
BUDGET=540
LOGS=0
RUN_TESTS=1 RUN_SANITIZER=1 RUN_BENCH=1 RUN_COMPILE=1 DRY_RUN=0

need_value() {
  if [ $# -lt 2 ] || [ -z "$2" ]; then
    echo "error: $1 needs a value" >&2; usage >&2; exit 2
  fi
}

while [ $# -gt 0 ]; do
  case "$1" in
    --out) need_value "$@"; OUT="$2"; shift 2 ;;
    --shared) need_value "$@"; SHARED="$2"; shift 2 ;;
    --python) need_value "$@"; PY="$2"; shift 2 ;;
    --work) need_value "$@"; WORK="$2"; shift 2 ;;
    --full) BENCH_MODE="--full"; COMPILE_MODE=""; BENCH_LIMIT=2400; shift ;;
    --budget) need_value "$@"; BUDGET="$2"; shift 2 ;;
    --logs) LOGS=1; shift ;;
    --skip-tests) RUN_TESTS=0; shift ;;
    --skip-sanitizer) RUN_SANITIZER=0; shift ;;
    --skip-bench) RUN_BENCH=0; shift ;;
    --skip-compile) RUN_COMPILE=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done

case "$BUDGET" in
  ''|*[!0-9]*) echo "error: --budget needs whole seconds, got '$BUDGET'" >&2; exit 2 ;;
esac
DEADLINE=$(( $(date +%s) + BUDGET ))

if [ -z "$SHARED" ]; then
  if [ -d "$REPO/../shared" ]; then SHARED="$REPO/../shared"; else SHARED="$REPO/shared"; fi
fi

# name | timeout (s) | pytest arguments (relative to the checkout)
TEST_GROUPS=(
  "kernels|300|tests/test_kernels.py"
  "golden|300|tests/test_golden.py"
  "training|240|tests/test_train.py -k triton"
  "api|300|tests/test_upscale.py tests/test_model.py tests/test_loading.py"
  "precision|240|tests/test_precision.py tests/test_autocast.py"
  "compile|300|tests/test_compile.py tests/test_graphs.py tests/test_host_sync.py"
)
DTYPES=(float32 float16 bfloat16)
# a training step under the sanitizer too where its kernels have not run on a GPU yet
sanitizer_train() { [ "$1" = float32 ] || echo --train; }

if [ "$DRY_RUN" = 1 ]; then
  echo "checkout: $REPO"
  echo "shared:   $SHARED"
  echo "out:      $OUT"
  echo "python:   $PY"
  echo "budget:   $BUDGET s"
  echo "plan:"
  echo "  install (a copy of the sources; pip install --no-deps --no-build-isolation"\
       "--no-index --target <work>/site)"
  if [ "$RUN_TESTS" = 1 ]; then
    for group in "${TEST_GROUPS[@]}"; do
      IFS='|' read -r name limit args <<<"$group"
      echo "  tests-$name (${limit} s): pytest $args"
    done
  fi
  if [ "$RUN_BENCH" = 1 ]; then
    echo "  bench ($BENCH_LIMIT s, within the time left): bench/gpu_bench.py $BENCH_MODE"
    "$PY" "$REPO/bench/gpu_bench.py" --weights "$SHARED/weights/CAMixerSR_S.pth" \
      --image "$SHARED/data/Urban100/HR/img_001.png" $BENCH_MODE \
      --sections "$BENCH_SECTIONS" --dry-run 2>/dev/null | sed 's/^/    /'
  fi
  [ "$RUN_COMPILE" = 1 ] && echo "  compile-graphs (240 s): bench/gpu_compile_graphs.py" \
                                 "${COMPILE_MODE:-(full)}"
  if [ "$RUN_SANITIZER" = 1 ]; then
    for dtype in "${DTYPES[@]}"; do
      echo "  sanitizer-$dtype (240 s): compute-sanitizer memcheck bench/gpu_forward.py" \
           "--dtype $dtype $(sanitizer_train "$dtype")"
    done
  fi
  echo "  summary: $OUT/gpu-<date>.json, $OUT/gpu-<date>.md"
  exit 0
fi

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
then
  echo "error: no CUDA device visible to $PY (torch.cuda.is_available() is False)" >&2
  exit 3
fi

# -P (Python 3.11+) for -c and -m: the working directory stays off sys.path. Scripts run
# plainly: their own folder (bench/) goes first on sys.path, and holds no package.
P="$("$PY" -c 'import sys; print("-P" if sys.version_info >= (3, 11) else "")')"

mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
if [ -z "$WORK" ]; then WORK="$(mktemp -d -t camixer-gpu-check.XXXXXX)"; fi
mkdir -p "$WORK" && WORK="$(cd "$WORK" && pwd)"
: >"$WORK/steps.tsv"
export CAMIXER_FAST_SHARED="$SHARED"
export TRITON_CACHE_DIR="$WORK/triton-cache"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
cd "$WORK"              # never the checkout: its camixer_fast/ would shadow the installed one

RESERVE=20              # seconds kept for the summary

# step NAME LIMIT LOG COMMAND...: run within min(LIMIT, time left), record status and seconds
step() {
  local name="$1" limit="$2" log="$3"; shift 3
  local start status code left
  start=$(date +%s)
  left=$(( DEADLINE - RESERVE - start ))
  if [ "$left" -lt 15 ]; then
    skip "$name" out-of-time "no time left in the ${BUDGET} s budget"
    echo "== $name: skipped, no time left" >&2
    return 1
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== $name (at most $limit s)" >&2
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  code=$?
  case $code in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - start ))" \
    "exit $code, log $(basename "$log")" >>"$WORK/steps.tsv"
  echo "   $status (exit $code, $(( $(date +%s) - start )) s)" >&2
  return $code
}

skip() { printf '%s\t%s\t0\t%s\n' "$1" "$2" "$3" >>"$WORK/steps.tsv"; }

COMMIT="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
# build from a copy: setuptools writes build/ and *.egg-info next to the sources
rm -rf "$WORK/src" && mkdir -p "$WORK/src"
cp -r "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/camixer_fast" "$REPO/kernels" \
  "$REPO/reference" "$WORK/src/"
if ! step install 180 "$WORK/install.log" "$PY" -m pip install --no-deps \
    --no-build-isolation --no-index --quiet --target "$WORK/site" "$WORK/src"; then
  echo "error: could not install the project; see $WORK/install.log" >&2
  tail -20 "$WORK/install.log" >&2
  exit 1
fi
export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
"$PY" $P -c "import camixer_fast, camixer_fast.kernels, camixer_fast.reference, sys
assert camixer_fast.__file__.startswith('$WORK/site'), camixer_fast.__file__
print(camixer_fast.__file__)" >"$WORK/import.log" 2>&1 \
  || { echo "error: the installed package does not import; see $WORK/import.log" >&2; exit 1; }
"$PY" "$REPO/bench/gpu_summary.py" env --commit "$COMMIT" >"$WORK/env.json" 2>>"$WORK/import.log"

if [ "$RUN_TESTS" = 1 ]; then
  for group in "${TEST_GROUPS[@]}"; do
    IFS='|' read -r name limit args <<<"$group"
    paths=()
    for arg in $args; do
      case "$arg" in tests/*) paths+=("$REPO/$arg") ;; *) paths+=("$arg") ;; esac
    done
    step "tests-$name" "$limit" "$WORK/tests-$name.log" "$PY" $P -m pytest "${paths[@]}" \
      -p no:cacheprovider -q --junitxml="$WORK/tests-$name.xml" || true
  done
else
  skip tests skipped "--skip-tests"
fi

if [ "$RUN_BENCH" = 1 ]; then
  WEIGHTS="$SHARED/weights/CAMixerSR_S.pth"
  IMAGE="$SHARED/data/Urban100/HR/img_001.png"
  LARGE="$SHARED/data/Urban100/HR/img_002.png"
  if [ -f "$WEIGHTS" ] && [ -f "$IMAGE" ]; then
    # the benchmark ends its sections within its own budget, inside the step's limit
    left=$(( DEADLINE - RESERVE - $(date +%s) ))
    limit=$(( BENCH_LIMIT < left ? BENCH_LIMIT : left ))
    [ -f "$LARGE" ] || LARGE="$IMAGE"
    step bench "$limit" "$WORK/bench.log" "$PY" "$REPO/bench/gpu_bench.py" \
      --weights "$WEIGHTS" --image "$IMAGE" --large-image "$LARGE" --json "$WORK/bench.json" \
      --results-md "$WORK/RESULTS-gpu.md" \
      --commit "$COMMIT" --budget $(( limit > 40 ? limit - 20 : 20 )) \
      --sections "$BENCH_SECTIONS" $BENCH_MODE || true
  else
    skip bench unavailable "missing $WEIGHTS or $IMAGE"
  fi
else
  skip bench skipped "--skip-bench"
fi

if [ "$RUN_COMPILE" = 1 ]; then
  WEIGHTS="$SHARED/weights/CAMixerSR_S.pth"
  IMAGE="$SHARED/data/Urban100/HR/img_001.png"
  if [ -f "$WEIGHTS" ] && [ -f "$IMAGE" ]; then
    step compile-graphs 240 "$WORK/compile-graphs.log" "$PY" \
      "$REPO/bench/gpu_compile_graphs.py" --weights "$WEIGHTS" --image "$IMAGE" \
      --json "$WORK/compile-graphs.json" $COMPILE_MODE || true
  else
    skip compile-graphs unavailable "missing $WEIGHTS or $IMAGE"
  fi
else
  skip compile-graphs skipped "--skip-compile"
fi

if [ "$RUN_SANITIZER" = 1 ]; then
  SANITIZER="$(command -v compute-sanitizer || true)"
  for candidate in /usr/local/cuda/bin/compute-sanitizer /opt/cuda/bin/compute-sanitizer; do
    [ -z "$SANITIZER" ] && [ -x "$candidate" ] && SANITIZER="$candidate"
  done
  if [ -z "$SANITIZER" ]; then
    skip sanitizer unavailable "compute-sanitizer not found"
  else
    for dtype in "${DTYPES[@]}"; do
      step "sanitizer-$dtype" 240 "$WORK/sanitizer-$dtype.log" "$SANITIZER" --tool memcheck \
        --error-exitcode 99 --print-limit 20 "$PY" "$REPO/bench/gpu_forward.py" \
        --dtype "$dtype" $(sanitizer_train "$dtype") || true
    done
  fi
else
  skip sanitizer skipped "--skip-sanitizer"
fi

RESULTS_MD=()
# the GPU section of RESULTS.md, when the results go to the checkout's own folder
[ "$OUT" = "$REPO/bench/results" ] && RESULTS_MD=(--results-md "$REPO/bench/RESULTS.md")
"$PY" "$REPO/bench/gpu_summary.py" summarize --work "$WORK" --out "$OUT" \
  ${RESULTS_MD[@]+"${RESULTS_MD[@]}"}
status=$?
if [ "$LOGS" = 1 ]; then
  tar -czf "$OUT/gpu-logs-$(date -u +%Y-%m-%d).tar.gz" -C "$WORK" --exclude=./site \
    --exclude=./src --exclude=./triton-cache .
fi
echo "work folder (logs): $WORK" >&2
exit $status
