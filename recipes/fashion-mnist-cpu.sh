#!/usr/bin/env bash
# Fashion-MNIST on a CPU, 28 px: the recipe of `make demo` (docs/cpu-recipe.md says how each value
# was chosen). Usage: bash recipes/fashion-mnist-cpu.sh METHOD [more flags, which win]
#   METHOD: simclr | barlowtwins | vicreg | instance_simclr
#   e.g. bash recipes/fashion-mnist-cpu.sh vicreg --time-budget-min 10
# Data: data/fashion-mnist_{train,val}.beton (python write_beton.py), or DATA_DIR=...
set -euo pipefail
method=${1:?usage: $0 simclr|barlowtwins|vicreg|instance_simclr [flags]}; shift
data=${DATA_DIR:-data}
py=${PYTHON:-python}
# ResNet-18 at half width (a quarter of the multiply-adds: ~4x more steps per CPU minute), the
# stride-2 small stem (~3x cheaper at 28 px), torchvision's init (zero-init residuals cost ~5 points
# in short runs), warm-up over the first 3% of the schedule, 28 px views.
common=(--train-beton "$data/fashion-mnist_train.beton" --val-beton "$data/fashion-mnist_val.beton"
        --width 32 --stem small-stride2 --no-zero-init-residual --epochs 100 --warmup-epochs 3
        --time-budget-min 20)
views=(--view1.resolution 28 --view2.resolution 28)
gentle=(--view1.crop-scale 0.3 1 --view2.crop-scale 0.3 1 --view1.blur-p 0 --view2.blur-p 0)
lars=(--base-lr 0.3 --weight-decay 1e-4 --lars-eta 0.02)  # solo-learn's CIFAR LARS settings
case "$method" in
  simclr)  # batch 64 and AdamW: more steps per minute learnt more than larger batches
    args=("${views[@]}" --batch-size 64 --optimizer adamw --base-lr 8e-3 --weight-decay 1e-4
          --temperature 0.2 --view1.crop-scale 0.3 1 --view2.crop-scale 0.3 1
          --projector-dims 512 128) ;;
  barlowtwins)
    args=("${views[@]}" "${gentle[@]}" "${lars[@]}" --batch-size 64 --projector-dims 1024 1024 1024) ;;
  vicreg)
    args=("${views[@]}" "${gentle[@]}" "${lars[@]}" --batch-size 128 --projector-dims 2048 2048 2048) ;;
  instance_simclr)
    args=(--resolution 28 --batch-size 128) ;;
  *) echo "error: unknown method '$method'; use simclr, barlowtwins, vicreg or instance_simclr" >&2
     exit 2 ;;
esac
exec $py "$method.py" "${common[@]}" "${args[@]}" --out-dir "runs/fashion-mnist-cpu/$method" "$@"
