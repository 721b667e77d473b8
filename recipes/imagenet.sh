#!/usr/bin/env bash
# ImageNet (1000 classes) or ImageNet-100 on GPUs, 224 px views, ResNet-50 (ImageNet-100: ResNet-18),
# each method's official recipe at a batch of 256 (the paper this project follows: one GPU), 100
# epochs; evaluation on the 0.875 centre crop. Usage:
#   bash recipes/imagenet.sh METHOD [more flags]                    # ImageNet, data/imagenet_*.beton
#   SUBSET=imagenet100 bash recipes/imagenet.sh METHOD [flags]      # data/imagenet100_*.beton
#   LAUNCH="torchrun --nproc-per-node 8" bash recipes/imagenet.sh simclr --batch-size 2048
# Data: python write_beton.py --dataset imagefolder --data-dir /data/imagenet --name imagenet \
#         --max-short-side 256 --write-mode proportion --compress-probability 0.5 --jpeg-quality 90
set -euo pipefail
method=${1:?usage: $0 simclr|barlowtwins|vicreg|instance_simclr [flags]}; shift
data=${DATA_DIR:-data}
name=${SUBSET:-imagenet}
classes=1000; arch=resnet50
if [ "$name" = imagenet100 ]; then classes=100; arch=resnet18; fi
launch=${LAUNCH:-${PYTHON:-python}}
common=(--train-beton "$data/${name}_train.beton" --val-beton "$data/${name}_val.beton"
        --num-classes "$classes" --arch "$arch" --stem imagenet --epochs 100 --batch-size 256
        --eval-crop-ratio 0.875)  # --num-workers 0 (default): this process's share of the cores
v=(--view1.resolution 224 --view2.resolution 224)
case "$method" in
  simclr)  # SimCLR's ImageNet views: colour strength 1.0 (0.8/0.8/0.8/0.2), blur p=0.5 on both
    args=("${v[@]}" --view1.brightness 0.8 --view1.contrast 0.8 --view1.saturation 0.8
          --view1.hue 0.2 --view2.brightness 0.8 --view2.contrast 0.8 --view2.saturation 0.8
          --view2.hue 0.2 --view1.blur-p 0.5 --view2.blur-p 0.5) ;;
  barlowtwins|vicreg)  # the files' defaults: BYOL's views (blur 1.0 / 0.1, solarization 0 / 0.2)
    args=("${v[@]}") ;;
  instance_simclr)
    args=(--resolution 224 --patch-scale 0.08 0.25) ;;
  *) echo "error: unknown method '$method'" >&2; exit 2 ;;
esac
exec $launch "$method.py" "${common[@]}" "${args[@]}" --out-dir "runs/$name/$method" "$@"
