#!/usr/bin/env bash
# CIFAR-10 on one GPU, 32 px, ResNet-18 with the small stem: solo-learn's CIFAR recipes
# (github.com/vturrisi/solo-learn, scripts/pretrain/cifar/*.yaml): LARS eta 0.02, weight decay 1e-4,
# 1000 epochs, batch 256. Usage: bash recipes/cifar10.sh METHOD [more flags, which win]
# Data: python write_beton.py --dataset cifar10 --data-dir ~/data/cifar10  (data/cifar10_*.beton)
set -euo pipefail
method=${1:?usage: $0 simclr|barlowtwins|vicreg|instance_simclr [flags]}; shift
data=${DATA_DIR:-data}
py=${PYTHON:-python}
common=(--train-beton "$data/cifar10_train.beton" --val-beton "$data/cifar10_val.beton"
        --num-classes 10 --stem small --epochs 1000 --batch-size 256 --warmup-epochs 10
        --weight-decay 1e-4 --lars-eta 0.02)
v=(--view1.resolution 32 --view2.resolution 32)
case "$method" in
  simclr)  # solo-learn's symmetric views: colour strength 1.0, blur 0.5 on both; temperature 0.2
    # (SimCLR's own CIFAR recipe: strength 0.5, no blur, temperature 0.5: simclr.py's default views)
    args=("${v[@]}" --base-lr 0.4 --temperature 0.2 --projector-dims 2048 256
          --view1.brightness 0.8 --view1.contrast 0.8 --view1.saturation 0.8 --view1.hue 0.2
          --view2.brightness 0.8 --view2.contrast 0.8 --view2.saturation 0.8 --view2.hue 0.2
          --view1.blur-p 0.5 --view2.blur-p 0.5) ;;
  barlowtwins)  # solo-learn's asymmetric views: no blur, solarization 0 / 0.2
    # (solo-learn also scales the loss by 0.1: with LARS that mostly cancels; not done here)
    args=("${v[@]}" --base-lr 0.3 --base-lr-biases 0.3 --projector-dims 2048 2048 2048
          --view1.blur-p 0 --view2.blur-p 0 --view1.solarize-p 0 --view2.solarize-p 0.2) ;;
  vicreg)  # solo-learn's VICReg views: crops of 20-100%, solarization 0.1 on both, no blur
    args=("${v[@]}" --base-lr 0.3 --projector-dims 2048 2048 2048
          --view1.crop-scale 0.2 1 --view2.crop-scale 0.2 1 --view1.blur-p 0 --view2.blur-p 0
          --view1.solarize-p 0.1 --view2.solarize-p 0.1) ;;
  instance_simclr)
    args=(--resolution 32 --base-lr 0.4 --temperature 0.2) ;;
  *) echo "error: unknown method '$method'" >&2; exit 2 ;;
esac
exec $py "$method.py" "${common[@]}" "${args[@]}" --out-dir "runs/cifar10/$method" "$@"
