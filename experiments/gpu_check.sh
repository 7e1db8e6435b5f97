#!/usr/bin/env bash
# GPU check of gen_jax: speed and model FLOP utilisation (MFU), then a short real training run.
#
# Prepared for a one-GPU machine (e.g. an NVIDIA H200); nothing else depends on it. Run from the
# repository root, with the CIFAR-10 image folder copied into the ignored folder data_local/:
#
#   mkdir -p data_local && cp /work/shared/data/cifar10-jpeg.tar.gz data_local/   # 19 MB
#   bash experiments/gpu_check.sh                      # whole check, about 8 minutes
#
# Environment knobs: EPOCHS (training epochs, default 4), BUDGET_S (total seconds, default 470),
# PEAK_FLOPS (device peak FLOP/s used for MFU, default 989e12 = H200 dense bfloat16),
# SKIP_INSTALL=1 (keep the installed jax), PYTHON (interpreter, default python).
#
# Steps:
#   1. pip install "jax[cuda12]==0.10.2" (and the project's requirements if they are missing).
#   2. experiments/bench.py: robust_step for resnet18 and wrn34_10 at batch 128 and 512 in float32
#      and bfloat16 (the issue's target: WRN-34-10 bfloat16 robust step at >= 40 % of peak), the
#      generalist step and PGD-20 for a subset; one JSON line each, into runs/gpu/bench.jsonl.
#      MFU uses the model-FLOP convention of bench.py (XLA's count of one forward pass F; a
#      training forward+backward 3F, a PGD iteration 2F) against PEAK_FLOPS for every dtype.
#   3. experiments/train.py --preset cifar10 shortened to EPOCHS epochs on the image folder
#      data_local/cifar10-jpeg (the JPEG copy of CIFAR-10: accuracies are close to, not equal to,
#      published CIFAR-10 figures), then its summary (clean and PGD-20 accuracy of the 3 models).
# Every step runs under `timeout` with what is left of BUDGET_S, so the script ends in time and
# prints whatever it measured.
set -u -o pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
EPOCHS=${EPOCHS:-4}
BUDGET_S=${BUDGET_S:-470}
PEAK_FLOPS=${PEAK_FLOPS:-989e12}
OUT_DIR=runs/gpu
BENCH_OUT=$OUT_DIR/bench.jsonl
DATA_DIR=data_local/cifar10-jpeg
START=$SECONDS
mkdir -p "$OUT_DIR"
: > "$BENCH_OUT"

left() { echo $(( BUDGET_S - (SECONDS - START) )); }
phase() { echo; echo "=== [$(( SECONDS - START )) s] $*"; }

phase "1. install"
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  $PYTHON -m pip install -q "jax[cuda12]==0.10.2" 2>&1 | tail -3 \
    || echo "WARNING: pip install jax[cuda12] failed; using the installed jax"
  $PYTHON -c "import flax, optax, chex" 2>/dev/null || \
    $PYTHON -m pip install -q -r requirements.txt 2>&1 | tail -3
fi
$PYTHON - <<'EOF' || { echo "ERROR: no GPU visible to JAX; stopping."; exit 1; }
import jax
print("jax", jax.__version__, "backend", jax.default_backend(), jax.devices())
assert jax.default_backend() == "gpu", "JAX does not see a GPU"
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true

bench() {  # bench <timeout cap s> <bench.py flags...>
  local cap=$1; shift
  local t; t=$(left); (( t > cap )) && t=$cap
  if (( t < 20 )); then echo "skipped (budget): $*"; return; fi
  timeout "$t" $PYTHON experiments/bench.py --peak-flops "$PEAK_FLOPS" --out "$BENCH_OUT" "$@" \
    | cut -c1-400 || echo "bench ended with status $? (timeout or error): $*"
}

phase "2. benchmarks -> $BENCH_OUT"
# Training time first: keep about 180 s of the budget for step 3.
BENCH_BUDGET=$(( BUDGET_S - 180 ))
for model in wrn34_10 resnet18; do
  for dtype in bfloat16 float32; do
    for batch in 128 512; do
      (( $(left) < BUDGET_S - BENCH_BUDGET )) && break 3
      bench 60 --what robust_step --model $model --batch-size $batch --dtype $dtype --repeats 5
    done
  done
done
(( $(left) > 200 )) && bench 70 --what generalist_step,pgd20 --model resnet18 --batch-size 128 \
  --dtype bfloat16 --repeats 5
(( $(left) > 200 )) && bench 70 --what generalist_step --model wrn34_10 --batch-size 128 \
  --dtype bfloat16 --repeats 3

$PYTHON - "$BENCH_OUT" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print(f"{'what':<16} {'model':<9} {'batch':>5} {'dtype':<9} {'img/s':>9} {'s/step':>8} "
      f"{'compile':>8} {'TFLOP/s':>8} {'MFU':>6} {'peak GB':>8}")
for r in rows:
  if "error" in r or r.get("images_per_second") is None:
    print(r); continue
  tf = (r.get("model_flops_per_second") or 0) / 1e12
  mem = (r.get("peak_memory_bytes") or 0) / 1e9
  print(f"{r['what']:<16} {r['model']:<9} {r['batch']:>5} {r['dtype']:<9} "
        f"{r['images_per_second']:>9.1f} {r['seconds_per_step']:>8.4f} "
        f"{r['compile_seconds']:>8.1f} {tf:>8.1f} {r.get('mfu', 0):>6.1%} {mem:>8.2f}")
EOF

phase "3. training: cifar10 preset, $EPOCHS epochs, image folder $DATA_DIR"
if [ ! -d "$DATA_DIR" ] && [ -f data_local/cifar10-jpeg.tar.gz ]; then
  tar xzf data_local/cifar10-jpeg.tar.gz -C data_local
fi
if [ ! -d "$DATA_DIR/train" ]; then
  echo "ERROR: $DATA_DIR/train not found; copy cifar10-jpeg.tar.gz into data_local/ (see header)."
  exit 1
fi
T=$(left)
if (( T < 60 )); then echo "no budget left for training ($T s)"; exit 0; fi
timeout "$T" $PYTHON experiments/train.py --preset cifar10 --dataset folder --data-dir "$DATA_DIR" \
  --epochs "$EPOCHS" --workdir "$OUT_DIR/train" --no-progress 2>&1 | tail -25 \
  || echo "training ended with status $? (timeout after $T s or error)"
[ -f "$OUT_DIR/train/summary.json" ] && cat "$OUT_DIR/train/summary.json"
phase "done"
