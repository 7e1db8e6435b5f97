#!/usr/bin/env bash
# GPU check of gen_jax on an accelerator image as it is: no network, no install, a time budget.
#
#   bash experiments/gpu_check.sh --out DIR            # the whole check, 480 s by default
#   bash experiments/gpu_check.sh --budget 900 --data ROOT --out DIR
#   bash experiments/gpu_check.sh --help
#
# It uses the jax it finds (prints jax.__version__, the backend and the devices) and stops with a
# message when JAX sees no accelerator, unless --allow-cpu (the CPU smoke test of
# tests/test_gpu_check.py). Nothing is installed: run it on an image with jax, flax, optax,
# orbax-checkpoint, scikit-learn, pillow, matplotlib and tqdm (no TensorFlow/TFDS needed); the
# script puts the checkout on PYTHONPATH, so `pip install --no-deps -e .` is optional.
#
# Data: the CIFAR-10 image folder ROOT/{train,test}/<class>/*.jpg, from --data ROOT, else
# data_local/cifar10-jpeg/ (ignored by git), extracted once from data_local/cifar10-jpeg.tar.gz
# (the copy of ../shared/data/cifar10-jpeg.tar.gz that travels with the work tree: 19 MB), or
# from ../shared/data/ where that exists. `--data preset` uses the preset's own data set instead.
# The JPEG copy's accuracies are close to, not equal to, published CIFAR-10 figures.
#
# Steps (each under `timeout`, bounded by what is left of the budget, so the script always ends
# in time and reports what it measured; the budget is printed first):
#   1. env        jax, jaxlib, flax, optax, orbax, chex versions, backend, devices, nvidia-smi.
#   2. data       the image folder (extracted if needed), loaded once and timed.
#   3. bench      experiments/bench.py: natural, robust and generalist step and PGD-20 for each
#                 --models x --batches x --dtypes (resnet18, wrn34_10; 128, 512; float32,
#                 bfloat16), with model FLOP utilisation against the device's peak: dense bf16
#                 for bfloat16, TF32 for float32 (XLA's default precision allows TF32 on GPUs;
#                 PGD-20 always runs in float32). At most --bench-share of the budget; points
#                 that do not fit are listed as skipped.
#   4. plan       epochs of the real run = what is left (minus the AutoAttack reserve) over the
#                 measured time of one epoch of the three methods plus compile, data and
#                 evaluation time; fewer training images (--max-train-per-class) when not even
#                 one epoch fits. Also the expected wall time of the paper's 120-epoch runs.
#   5. compare    experiments/compare.py --preset cifar10 with those epochs: natural, pgd_at and
#                 generalist on the same budget, clean and PGD-20 accuracy, the chord score.
#   6. autoattack AutoAttack (standard) on the first --aa-n (1,000) test images for the global
#                 model of the generalist run and of the pgd_at run (as `evaluate.py --attacks
#                 clean,aa --n 1000`, without the sanity analyses).
#   7. summary    OUT/summary.md; every figure is also a JSON line of OUT/figures.jsonl (phase:
#                 env, data, bench, plan, estimate, compare, chord, autoattack, timing) and the
#                 console output is in OUT/log.txt.
#
# On this workplace's H200 (no network; the tarball carried in the work tree), one call:
#   run(command="bash experiments/gpu_check.sh --out $OUT", timeout_s=560,
#       carry=["data_local/cifar10-jpeg.tar.gz"])
set -u -o pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
START=$SECONDS

usage() {
  sed -n '2,/^set -u/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
  cat <<'EOF'
Options (defaults in brackets):
  --out DIR            figures.jsonl, summary.md, log.txt [runs/gpu-check/report]
  --workdir DIR        training runs and scratch files, wiped at the start [runs/gpu-check/work]
  --budget S           total seconds [$BUDGET_S or 480]
  --data ROOT|preset   image folder [data_local/cifar10-jpeg, extracted if needed]
  --data-local DIR     where cifar10-jpeg(.tar.gz) is looked for and extracted [data_local]
  --preset NAME        preset of the real run [cifar10]
  --models LIST        bench models, comma-separated [resnet18,wrn34_10]
  --batches LIST       bench batch sizes [128,512]
  --dtypes LIST        bench compute dtypes [float32,bfloat16]
  --bench-what LIST    bench workloads [natural_step,robust_step,generalist_step,pgd20]
  --bench-repeats N    timed repetitions per measurement [5]
  --bench-share F      at most this fraction of the budget for the benchmarks [0.35]
  --aa-n N             AutoAttack test images (0: skip) [1000]
  --aa-batch N         AutoAttack batch size [500]
  --aa-share F         fraction of the budget kept for AutoAttack [0.2]
  --peak-bf16 F        device peak FLOP/s in bfloat16 [from the device kind]
  --peak-f32 F         device peak FLOP/s in float32 (TF32 on GPUs) [from the device kind]
  --allow-cpu          run on CPU too (smoke test); otherwise a CPU backend stops the check
  --python PY          interpreter [$PYTHON, else python3, else python]
EOF
}

OUT=runs/gpu-check/report
WORK=runs/gpu-check/work
BUDGET=${BUDGET_S:-480}
DATA=""
DATA_LOCAL=data_local
PRESET=cifar10
MODELS=resnet18,wrn34_10
BATCHES=128,512
DTYPES=float32,bfloat16
BENCH_WHAT=natural_step,robust_step,generalist_step,pgd20
BENCH_REPEATS=5
BENCH_SHARE=0.35
AA_N=1000
AA_BATCH=500
AA_SHARE=0.2
PEAK_BF16=""
PEAK_F32=""
ALLOW_CPU=0
PY=${PYTHON:-}
while (($#)); do
  case $1 in
    --out) OUT=$2; shift ;;
    --workdir) WORK=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    --data) DATA=$2; shift ;;
    --data-local) DATA_LOCAL=$2; shift ;;
    --preset) PRESET=$2; shift ;;
    --models) MODELS=$2; shift ;;
    --batches) BATCHES=$2; shift ;;
    --dtypes) DTYPES=$2; shift ;;
    --bench-what) BENCH_WHAT=$2; shift ;;
    --bench-repeats) BENCH_REPEATS=$2; shift ;;
    --bench-share) BENCH_SHARE=$2; shift ;;
    --aa-n) AA_N=$2; shift ;;
    --aa-batch) AA_BATCH=$2; shift ;;
    --aa-share) AA_SHARE=$2; shift ;;
    --peak-bf16) PEAK_BF16=$2; shift ;;
    --peak-f32) PEAK_F32=$2; shift ;;
    --allow-cpu) ALLOW_CPU=1 ;;
    --python) PY=$2; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  (($# > 0)) && shift
done
if [ -z "$PY" ]; then
  PY=$(command -v python3 || command -v python || true)
fi
if [ -z "$PY" ]; then
  echo "gpu_check: no python3 or python on the PATH; pass --python PY." >&2
  exit 2
fi
BUDGET=${BUDGET%.*}
if ! [[ $BUDGET =~ ^[0-9]+$ ]] || ((BUDGET < 1)); then
  echo "gpu_check: --budget must be a positive number of seconds; got $BUDGET" >&2
  exit 2
fi
share() { awk -v b="$BUDGET" -v f="$1" 'BEGIN { printf "%d", b * f }'; }
BENCH_BUDGET=$(share "$BENCH_SHARE")
AA_RESERVE=0
((AA_N > 0)) && AA_RESERVE=$(share "$AA_SHARE")
SUMMARY_RESERVE=15
((BUDGET < 120)) && SUMMARY_RESERVE=5
mkdir -p "$OUT" "$WORK" || exit 1
OUT=$(cd "$OUT" && pwd)
WORK=$(cd "$WORK" && pwd)
exec > >(tee "$OUT/log.txt") 2>&1
TEE_PID=$!
echo "gpu_check: budget ${BUDGET} s = benchmarks <= ${BENCH_BUDGET} s, then the real run" \
  "(what is left), AutoAttack ${AA_RESERVE} s, summary ${SUMMARY_RESERVE} s;" \
  "started $(date -u +%Y-%m-%dT%H:%M:%SZ)"

# The workdir is the script's own scratch: wiped so that no earlier run (with other epochs) is
# resumed. A non-empty folder that this script did not create is left alone.
if [ -n "$(ls -A "$WORK")" ] && [ ! -f "$WORK/.gpu_check" ]; then
  echo "gpu_check: --workdir $WORK is not empty and was not made by gpu_check; choose another." >&2
  exit 2
fi
find "$WORK" -mindepth 1 -delete
touch "$WORK/.gpu_check"
FIG=$OUT/figures.jsonl
: >"$FIG"

export GC_FIG=$FIG GC_WORK=$WORK GC_PRESET=$PRESET
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
# Programs that the three runs and AutoAttack share (the evaluation's) compile once.
export JAX_COMPILATION_CACHE_DIR=$WORK/jax-cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
HELPER="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/gpu_check_steps.py"

elapsed() { echo $((SECONDS - START)); }
left() { echo $((BUDGET - (SECONDS - START))); }
timing() { # timing STEP LIMIT SECONDS STATUS
  printf '{"phase": "timing", "step": "%s", "limit_seconds": %d, "seconds": %d, "status": "%s"}\n' \
    "$1" "$2" "$3" "$4" >>"$FIG"
}
STATUS=ok
run_step() { # run_step NAME LIMIT COMMAND...: the command under timeout; sets STATUS
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  if ((limit < 5)); then
    ((limit < 0)) && limit=0
    echo "=== [$(elapsed) s] $name: skipped, ${limit} s of budget left for it"
    timing "$name" "$limit" 0 skipped
    STATUS=skipped
    return 0
  fi
  echo "=== [$(elapsed) s] $name (limit ${limit} s)"
  timeout --kill-after=5 "$limit" "$@"
  rc=$?
  case $rc in
    0) STATUS=ok ;;
    124 | 137) STATUS=timeout; echo "--- $name stopped at its limit of ${limit} s" ;;
    *) STATUS="error (exit $rc)"; echo "--- $name failed (exit $rc)" ;;
  esac
  timing "$name" "$limit" $((SECONDS - t0)) "$STATUS"
}
min() { if (($1 < $2)); then echo "$1"; else echo "$2"; fi; }


finish() { # the summary, whatever happened before
  "$PY" "$HELPER" summary "$OUT/summary.md" "$BUDGET" "$(elapsed)" ||
    echo "gpu_check: the summary failed; the figures are in $FIG"
  echo
  cat "$OUT/summary.md" 2>/dev/null
  echo "gpu_check: done in $(elapsed) s of ${BUDGET} s; outputs in $OUT"
}
quit() { # quit CODE: after tee has written the whole log
  exec 1>&- 2>&-
  wait "$TEE_PID" 2>/dev/null
  exit "$1"
}

# ------------------------------------------------------------------------------- 1. env
NVSMI=$(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
  --format=csv,noheader 2>/dev/null | head -1 || true)
run_step env "$(min 120 "$(left)")" "$PY" "$HELPER" env "$ALLOW_CPU" "$PEAK_BF16" "$PEAK_F32" \
  "$NVSMI"
if [ "$STATUS" != ok ]; then
  echo "gpu_check: stopped at the environment check ($STATUS)."
  finish
  quit 2
fi
# shellcheck disable=SC1091
. "$WORK/env.sh"

# ------------------------------------------------------------------------------ 2. data
if [ -z "$DATA" ]; then
  DATA=$DATA_LOCAL/cifar10-jpeg
  if [ ! -d "$DATA/train" ]; then
    for tarball in "$DATA_LOCAL/cifar10-jpeg.tar.gz" "$ROOT/../shared/data/cifar10-jpeg.tar.gz"; do
      if [ -f "$tarball" ]; then
        echo "extracting $tarball into $DATA_LOCAL/"
        mkdir -p "$DATA_LOCAL" && tar xzf "$tarball" -C "$DATA_LOCAL" && break
      fi
    done
  fi
fi
if [ "$DATA" != preset ] && [ ! -d "$DATA/train" ]; then
  echo "ERROR: no image folder at $DATA (expected $DATA/{train,test}/<class>/*.jpg). Copy" \
    "../shared/data/cifar10-jpeg.tar.gz into $DATA_LOCAL/ (the script extracts it), or pass" \
    "--data ROOT, or --data preset for the preset's own data set."
  timing data 0 0 "error (no data)"
  finish
  quit 2
fi
[ "$DATA" != preset ] && DATA=$(cd "$DATA" && pwd)
run_step data "$(min 180 $(($(left) - AA_RESERVE - SUMMARY_RESERVE)))" "$PY" "$HELPER" data "$DATA"

# ----------------------------------------------------------------------------- 3. bench
BENCH_END=$((SECONDS + BENCH_BUDGET))
IFS=, read -r -a model_list <<<"$MODELS"
IFS=, read -r -a batch_list <<<"$BATCHES"
IFS=, read -r -a dtype_list <<<"$DTYPES"
POINT=$WORK/bench-point.jsonl
# The order of the points: the first (the real run's model and dtype, which the plan needs) first,
# then, per batch size, the other model in the other dtype, so that a budget that fits only a few
# points still covers both models and both dtypes.
points=()
for bi in "${!batch_list[@]}"; do
  for mi in "${!model_list[@]}"; do
    for di in "${!dtype_list[@]}"; do
      key=$((bi * 10000 + (mi + di) % 2 * 1000 + mi * 10 + di))
      points+=("$key ${batch_list[bi]} ${model_list[mi]} ${dtype_list[di]}")
    done
  done
done
pgd_done=""
while read -r _ batch model dtype; do
  # PGD-20 always runs in float32 (bench.py): measure it once per model and batch.
  what=$BENCH_WHAT
  if [[ ,$what, == *,pgd20,* ]] && [[ $pgd_done == *" $model/$batch "* ]]; then
    what=$(echo ",$what," | sed 's/,pgd20,/,/; s/^,//; s/,$//')
  fi
  [[ ,$what, == *,pgd20,* ]] && pgd_done="$pgd_done $model/$batch "
  [ -z "$what" ] && continue
  : >"$POINT"
  limit=$(min $((BENCH_END - SECONDS)) $(($(left) - AA_RESERVE - SUMMARY_RESERVE - 60)))
  run_step "bench $model $batch $dtype" "$limit" "$PY" experiments/bench.py --what "$what" \
    --model "$model" --batch-size "$batch" --dtype "$dtype" --repeats "$BENCH_REPEATS" \
    --warmup 1 --out "$POINT"
  "$PY" "$HELPER" bench-merge "$POINT" "$model" "$batch" "$dtype" "$what" "$STATUS"
done < <(printf '%s\n' "${points[@]}" | sort -n -s -k1,1)

# ----------------------------------------------------------------------- 4. plan, 5. compare
COMPARE_DIR=$WORK/compare
RUN_BUDGET=$(($(left) - AA_RESERVE - SUMMARY_RESERVE - 5))
run_step plan "$(min 60 "$(left)")" "$PY" "$HELPER" plan "$RUN_BUDGET"
EPOCHS=""
MAX_TPC=""
MAX_TEST=""
# shellcheck disable=SC1091
[ -f "$WORK/plan.sh" ] && . "$WORK/plan.sh"
if [ -n "$EPOCHS" ]; then
  data_flags=()
  [ "$DATA" != preset ] && data_flags=(--dataset folder --data-dir "$DATA")
  [ -n "$MAX_TPC" ] && data_flags+=(--max-train-per-class "$MAX_TPC")
  [ -n "$MAX_TEST" ] && data_flags+=(--max-test-per-class "$MAX_TEST")
  run_step compare $(($(left) - AA_RESERVE - SUMMARY_RESERVE)) "$PY" experiments/compare.py \
    --preset "$PRESET" ${data_flags[@]+"${data_flags[@]}"} --epochs "$EPOCHS" \
    --eval-every "$EPOCHS" --eval-test-size 1000 --keep-checkpoints 1 --workdir "$COMPARE_DIR" \
    --no-progress
else
  timing compare 0 0 "skipped (no plan)"
fi
"$PY" "$HELPER" compare-figures "$COMPARE_DIR"

# ------------------------------------------------------------------------ 6. AutoAttack
if ((AA_N > 0)); then
  run_step autoattack $(($(left) - SUMMARY_RESERVE)) "$PY" "$HELPER" autoattack "$COMPARE_DIR" \
    "$AA_N" "$AA_BATCH"
fi

# --------------------------------------------------------------------------- 7. summary
finish
quit 0
