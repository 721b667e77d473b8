"""Does it learn? A method on Fashion-MNIST on the CPU against random-init encoders.

    python benchmarks/bench_fashion_mnist.py --quick                # the README's main job
    python benchmarks/bench_fashion_mnist.py                        # SimCLR, 20 min of training
    python benchmarks/bench_fashion_mnist.py --method barlowtwins   # or vicreg, instance_simclr
    python benchmarks/bench_fashion_mnist.py --budget-min 5 --seeds 0 1 2 3 4

Writes the .beton files if missing, trains <method>.py for a wall-clock budget (--time-budget-min:
the learning-rate schedule spans the budget, so a slow CPU trains fewer steps, not a truncated
schedule), then runs probe.py (linear, MLP, k-NN on frozen features; hyper-parameters chosen on a
holdout of the training images) on the trained backbone and on the same architecture with random
weights for several seeds, and prints a table: the random init as mean and standard deviation over
the seeds, the gain as trained minus that mean. The table also goes to <out>/table.md.

The recipe is recipes/fashion-mnist-cpu.sh (ResNet-18 at half width, --width 32, with the
stride-2 small stem and torchvision's init at 28 px; SimCLR batch 64 with AdamW, the others LARS
with solo-learn's CIFAR settings); docs/cpu-recipe.md says how it was found. Arguments this script
does not know go to the method's script (e.g. `--batch-size 256`, `--width 64`) and override the
recipe; `--precision` goes to the method's script and to the probes.
"""

import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = {"simclr": "SimCLR", "instance_simclr": "instance SimCLR", "barlowtwins": "Barlow Twins",
         "vicreg": "VICReg"}
METHODS = ("simclr", "barlowtwins", "vicreg", "instance_simclr")
RECIPE = os.path.join(ROOT, "recipes", "fashion-mnist-cpu.sh")  # the CPU recipe, in one place
QUICK_BUDGET_MIN = 6.0  # the main job's training minutes (README: the whole job's time)
FULL_BUDGET_MIN = 20.0


def run(cmd):
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def take(extra, flag, count=1, default=None):
    """Remove `flag` and its `count` values (or all values up to the next flag, count=-1)."""
    if flag not in extra:
        return default
    i = extra.index(flag)
    end = i + 1 + count if count >= 0 else next(
        (j for j in range(i + 1, len(extra)) if extra[j].startswith("--")), len(extra))
    values = extra[i + 1:end]
    del extra[i:end]
    if count >= 0 and len(values) != count:
        sys.exit(f"error: {flag} needs {count} value(s)")
    return values


def main(extra):
    quick = take(extra, "--quick", 0) is not None
    method = (take(extra, "--method") or ["simclr"])[0]
    if method not in METHODS:
        sys.exit(f"error: unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    budget = float((take(extra, "--budget-min") or [QUICK_BUDGET_MIN if quick else
                                                    FULL_BUDGET_MIN])[0])
    seeds = [int(s) for s in take(extra, "--seeds", -1, ["0", "1", "2"])]
    data = take(extra, "--data", 2, [os.path.join("data", "fashion-mnist_train.beton"),
                                     os.path.join("data", "fashion-mnist_val.beton")])
    out = take(extra, "--out-dir", 1, [os.path.join(
        "runs", "demo" if quick else f"bench_fashion_mnist/{method}")])[0]
    probe_subset = take(extra, "--probe-train-subset", 1, ["10000"])
    precision = (take(extra, "--precision") or [None])[0]  # for the training and the probes
    if budget <= 0 or len(seeds) < 1:
        sys.exit("error: --budget-min must be > 0 and --seeds must name at least one seed")
    py = sys.executable
    if not all(os.path.exists(os.path.join(ROOT, p)) for p in data):
        run([py, "write_beton.py"])
    data_flags = ["--train-beton", data[0], "--val-beton", data[1]]
    recipe = ["--time-budget-min", f"{budget:g}"]
    start = time.time()
    precision_flag = ["--precision", precision] if precision else []
    os.environ["PYTHON"] = py  # the recipe's interpreter: this one
    run(["bash", RECIPE, method, *data_flags, *recipe, *precision_flag, *extra, "--out-dir", out,
         "--no-resume"])
    train_minutes = (time.time() - start) / 60
    # The probes in this process: one import of torch and ffcv instead of one per probe.
    sys.path.insert(0, ROOT)
    os.chdir(ROOT)
    import probe

    settings = dict(backbone=os.path.join(out, "backbone.pt"), train_beton=data[0],
                    val_beton=data[1], train_subset=int(probe_subset[0]))
    if precision:
        settings["precision"] = precision
    for seed in [None, *seeds]:
        print(f"$ probe.py {settings['backbone']}"
              + (f" --random-init --seed {seed}" if seed is not None else ""), flush=True)
        probe.main(probe.Args(**settings) if seed is None else
                   probe.Args(**settings, random_init=True, seed=seed))
    ssl = json.load(open(os.path.join(ROOT, out, "probe_backbone.json")))
    rnd = [json.load(open(os.path.join(ROOT, out, f"probe_random_init_seed{s}.json")))
           for s in seeds]
    log = [json.loads(line) for line in open(os.path.join(ROOT, out, "log.jsonl"))]
    last = [r for r in log if "probe_acc" in r][-1]
    name = NAMES[method]
    lines = [
        f"{name}: {last['step']} steps of {ssl_batch(recipe_args(method) + extra)} images in "
        f"{last['train_min']:.1f} min of training ({train_minutes:.1f} min with start-up and "
        f"evaluation), {last['images_per_s']:.0f} images/s; probes fit on "
        f"{ssl['train_images']} train images (hyper-parameters chosen on a holdout of them), "
        f"tested once on {ssl['val_images']} val images; random init: seeds "
        f"{', '.join(map(str, seeds))}",
        "",
        f"| probe | {name} | random init, mean ± sd | random init, each seed | gain |",
        "|---|---|---|---|---|"]
    for head in ("linear", "mlp", "knn"):
        a = 100 * ssl[head]["top1"]
        b = [100 * r[head]["top1"] for r in rnd]
        sd = statistics.stdev(b) if len(b) > 1 else 0.0
        mean = statistics.mean(b)
        lines.append(f"| {head} | {a:.2f}% | {mean:.2f}% ± {sd:.2f} | "
                     f"{' / '.join(f'{v:.2f}' for v in b)} | **{a - mean:+.2f}** |")
    lines.append(f"\nonline monitors at the end: linear probe {100 * last['probe_acc']:.2f}%, "
                 f"k-NN {100 * last['knn_acc']:.2f}%, RankMe {last['rankme']:.1f}")
    text = "\n".join(lines)
    print("\n" + text)
    with open(os.path.join(ROOT, out, "table.md.tmp"), "w") as f:
        f.write(text + "\n")
    os.replace(os.path.join(ROOT, out, "table.md.tmp"), os.path.join(ROOT, out, "table.md"))


def recipe_args(method):
    """The flags the recipe script passes (bash prints them without running anything)."""
    done = subprocess.run(["bash", RECIPE, method], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": "echo"})
    return done.stdout.split()


def ssl_batch(args):
    """The last --batch-size given (the recipe's unless overridden)."""
    sizes = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--batch-size"]
    return sizes[-1] if sizes else "?"


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (FileNotFoundError, ValueError) as err:  # probe.py's one-line errors
        sys.exit(f"error: {err}")
