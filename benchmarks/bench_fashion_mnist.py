"""Does it learn? A method on Fashion-MNIST on the CPU against the random-init baseline.

    python benchmarks/bench_fashion_mnist.py                        # SimCLR, see the time below
    python benchmarks/bench_fashion_mnist.py --method barlowtwins   # or vicreg, instance_simclr
    python benchmarks/bench_fashion_mnist.py --quick                # the README's main job
    python benchmarks/bench_fashion_mnist.py --precision bf16       # as the README's table was made

Time on 2 CPU cores: the SimCLR run trained for 16 min in bf16 on a CPU where bf16 was 1.8x faster;
in fp32 on an AVX2-only EPYC a step takes ~12 s, ~1.6 h for the run. --quick: 15 min there.

Writes the .beton files if missing, trains <method>.py for a fixed budget (the same for every
method: batch 256, 28 px, 2 epochs), then runs probe.py (linear, MLP, k-NN on frozen features) on
the trained backbone and on the same architecture with random weights, and prints a table.
Other arguments go to the method's script (e.g. `--epochs 1`) and override the defaults below;
`--precision` goes to probe.py too.
"""

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Fashion-MNIST's native 28 px; a short warm-up for a short run.
COMMON = ["--batch-size", "256"]
VIEWS = ["--view1.resolution", "28", "--view2.resolution", "28"]
FULL = ["--epochs", "2", "--warmup-epochs", "0.2"]  # all 60k images, probes on all of them
QUICK = ["--epochs", "1", "--warmup-epochs", "0.1", "--train-subset", "10000"]
# The papers' 8192-wide projectors double the step time on this CPU (4.3 s vs 2.1 s per step of
# 256 images at 2048): the CPU benchmark uses 2048-wide ones. Pass --projector-dims to change it.
PER_METHOD = {"simclr": VIEWS, "instance_simclr": ["--resolution", "28"],
              "barlowtwins": VIEWS + ["--projector-dims", "2048", "2048", "2048"],
              "vicreg": VIEWS + ["--projector-dims", "2048", "2048", "2048"]}
NAMES = {"simclr": "SimCLR", "instance_simclr": "instance SimCLR", "barlowtwins": "Barlow Twins",
         "vicreg": "VICReg"}


def run(cmd):
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def main(extra):
    quick = "--quick" in extra
    extra = [a for a in extra if a != "--quick"]
    method = "simclr"
    if "--method" in extra:
        i = extra.index("--method")
        method = extra[i + 1] if i + 1 < len(extra) else ""
        del extra[i:i + 2]
    if method not in PER_METHOD:
        sys.exit(f"error: unknown --method {method!r}; choose one of {', '.join(PER_METHOD)}")
    precision = []
    if "--precision" in extra:
        i = extra.index("--precision")
        precision = extra[i:i + 2]
    budget = COMMON + (QUICK if quick else FULL) + PER_METHOD[method]
    out = os.path.join(ROOT, "runs", "demo" if quick else f"bench_fashion_mnist/{method}")
    probe_subset = ["--train-subset", "10000"] if quick else []
    py = sys.executable
    for split in ("train", "val"):
        if not os.path.exists(os.path.join(ROOT, "data", f"fashion-mnist_{split}.beton")):
            run([py, "write_beton.py"])
            break
    start = time.time()
    run([py, f"{method}.py", *budget, *extra, "--out-dir", out, "--no-resume"])
    train_minutes = (time.time() - start) / 60
    backbone = os.path.join(out, "backbone.pt")
    run([py, "probe.py", "--backbone", backbone, *probe_subset, *precision])
    run([py, "probe.py", "--backbone", backbone, "--random-init", *probe_subset, *precision])
    ssl = json.load(open(os.path.join(out, "probe_backbone.json")))
    rnd = json.load(open(os.path.join(out, "probe_random_init.json")))
    name = NAMES[method]
    print(f"\n{name} training: {train_minutes:.1f} min ({' '.join(budget + extra)}); probes fit on "
          f"{ssl['train_images']} train images, tested on {ssl['val_images']} val images")
    print(f"| probe | {name} top-1 | random init top-1 | gain |")
    print("|---|---|---|---|")
    for head in ("linear", "mlp", "knn"):
        a, b = 100 * ssl[head]["top1"], 100 * rnd[head]["top1"]
        print(f"| {head} | {a:.2f}% | {b:.2f}% | {a - b:+.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
