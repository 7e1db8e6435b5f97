#!/usr/bin/env bash
# Reproduce the paper: CIFAR-10, ResNet-18 and WRN-32-10, 120 epochs, batch 128, for generalist
# and the baselines pgd_at, trades and natural on the same budget; then clean, PGD-20 and
# AutoAttack (standard) accuracy of each run's global model on the full test set.
#
#   bash experiments/reproduce.sh --print                          # the commands, nothing run
#   bash experiments/reproduce.sh --model resnet18 --method generalist --data ROOT
#   bash experiments/reproduce.sh --reference-eps                  # the reference code's eps
#
# Options (defaults in brackets):
#   --model resnet18|wrn32_10|all       [all]  presets cifar10 (ResNet-18), cifar10-wrn (WRN-32-10)
#   --method generalist|pgd_at|trades|natural|all                                         [all]
#   --data tfds|ROOT   [tfds]  tfds: TFDS cifar10, prepared in ~/tensorflow_datasets (or
#                              $TFDS_DATA_DIR; needs gen_jax[tfds]); ROOT: an image folder
#                              ROOT/{train,test}/<class>/*.jpg (e.g. data_local/cifar10-jpeg)
#   --runs DIR         [runs/reproduce]  one run directory per model and method
#   --stage train|eval|all              [all]
#   --reference-eps    train and evaluate at eps 0.031, PGD step 0.007 (the reference code's
#                      settings; default 8/255 and 2/255) in run directories named *-ref
#   --print            print the commands instead of running them
#   --python PY        [python3, else python]
#
# Every run resumes from its directory, so the same command continues a stopped reproduction.
# The per-epoch test curve uses the first 1,000 test images (--eval-test-size 1000): model
# selection uses the validation split and the final figures the whole test set, so this changes
# no reported figure and halves the wall time (evaluating three models with PGD-20 on 10,000
# images every epoch costs about as much as training). Evaluation: PGD-20 and AutoAttack on the
# 10,000 test images, with the gradient-masking sanity checks on the first 500.
set -u -o pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1

MODELS=all
METHODS=all
DATA=tfds
RUNS=runs/reproduce
STAGE=all
REFERENCE=0
PRINT=0
PY=${PYTHON:-}
while (($#)); do
  case $1 in
    --model) MODELS=$2; shift ;;
    --method) METHODS=$2; shift ;;
    --data) DATA=$2; shift ;;
    --runs) RUNS=$2; shift ;;
    --stage) STAGE=$2; shift ;;
    --reference-eps) REFERENCE=1 ;;
    --print) PRINT=1 ;;
    --python) PY=$2; shift ;;
    -h | --help) sed -n '2,/^set -u/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "reproduce: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  (($# > 0)) && shift
done
if [ -z "$PY" ]; then
  PY=python
  [ "$PRINT" = 0 ] && PY=$(command -v python3 || command -v python || echo python)
fi
[ "$MODELS" = all ] && MODELS=resnet18,wrn32_10
[ "$METHODS" = all ] && METHODS=generalist,pgd_at,trades,natural
if [[ ! $STAGE =~ ^(train|eval|all)$ ]]; then
  echo "reproduce: --stage train|eval|all; got $STAGE" >&2
  exit 2
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

data_flags=()
if [ "$DATA" != tfds ]; then
  if [ "$PRINT" = 0 ] && [ ! -d "$DATA/train" ]; then
    echo "reproduce: no image folder at $DATA (expected $DATA/{train,test}/<class>/*.jpg)" >&2
    exit 2
  fi
  data_flags=(--dataset folder --data-dir "$DATA")
fi
eps_flags=()
suffix=""
if [ "$REFERENCE" = 1 ]; then
  eps_flags=(--eps 0.031 --step-size 0.007 --eval-step-size 0.007)
  suffix=-ref
fi

run() { # prints the command; runs it unless --print
  echo "$*"
  [ "$PRINT" = 1 ] && return 0
  "$@" || {
    echo "reproduce: failed (exit $?): $*" >&2
    exit 1
  }
}

IFS=, read -r -a model_list <<<"$MODELS"
IFS=, read -r -a method_list <<<"$METHODS"
for model in "${model_list[@]}"; do
  case $model in
    resnet18) preset=cifar10 ;;
    wrn32_10) preset=cifar10-wrn ;;
    *) echo "reproduce: --model resnet18|wrn32_10|all; got $model" >&2; exit 2 ;;
  esac
  for method in "${method_list[@]}"; do
    case $method in generalist | pgd_at | trades | natural) ;; *)
      echo "reproduce: --method generalist|pgd_at|trades|natural|all; got $method" >&2
      exit 2 ;;
    esac
    workdir=$RUNS/$preset-$method$suffix
    if [ "$STAGE" != eval ]; then
      run "$PY" experiments/train.py --preset "$preset" --method "$method" \
        ${data_flags[@]+"${data_flags[@]}"} ${eps_flags[@]+"${eps_flags[@]}"} \
        --eval-test-size 1000 --workdir "$workdir"
    fi
    if [ "$STAGE" != train ]; then
      # The run's own eps and PGD step (8/255 and 2/255, or 0.031 and 0.007 with --reference-eps).
      run "$PY" experiments/evaluate.py --workdir "$workdir" --model global \
        --attacks clean,pgd20,aa --no-boundary --no-corruptions
    fi
  done
done
