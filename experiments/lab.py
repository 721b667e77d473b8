"""What the claim experiments share, and nothing else: run a cell (a method file through its
recipe script, then probe.py), cached by its settings; random-init baselines; mean and spread over
seeds; a verdict rule; tables, plots and the results files.

A cell is one training run: `bash recipes/<recipe>.sh <method> <flags> --seed S --out-dir <cell>`,
then `probe.py` on its backbone. Its folder is named by a hash of everything that makes it (the
method, the recipe, the flags, the seed, the data's fingerprint, --quick): a cell that finished is
never trained again, and one that was interrupted resumes exactly (the method file resumes from
its checkpoint; probe.py runs once training is done). Choices are made on probe.py's holdout score
(the `holdout` numbers below), never on the test split; the test split is reported once per final
cell (the `test` numbers).
"""

import hashlib
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from typing import Literal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ffcv_ssl_common  # noqa: E402,F401  (also what makes tyro's --help keep sentences whole)

QUICK = ["--train-subset", "256", "--epochs", "1", "--warmup-epochs", "0",
         "--num-workers", "1"]
"""--quick: every run trains one epoch on 256 images, probes use 256 training images and 2
epochs: seconds per cell, so the tests run each script end to end; its numbers mean nothing."""


@dataclass
class Common:
    """Settings every claim experiment has."""

    quick: bool = False
    """A tiny budget (seconds per run) that checks the script end to end; the numbers mean
    nothing (the tests run every experiment this way)."""
    recipe: Literal["fashion-mnist-cpu", "cifar10", "imagenet"] = "fashion-mnist-cpu"
    """The base recipe (recipes/<recipe>.sh) each cell's flags are added to."""
    train_beton: str = "data/fashion-mnist_train.beton"
    """Training images (the recipe's data set)."""
    val_beton: str = "data/fashion-mnist_val.beton"
    """Validation images: the probes' test split (choices use a holdout of the training set)."""
    seeds: tuple[int, ...] = (0, 1)
    """Training seeds of every reported cell (and the random inits')."""
    out_dir: str = "runs/experiments"
    """Results go to <out-dir>/<experiment>/: cells/, results.json, table.md, <experiment>.png."""
    probe_train_subset: int = 10000
    """Training images the probes fit on (their holdout is a tenth of them)."""
    extra: tuple[str, ...] = ()
    """More flags for every training run, e.g. --extra --precision fp32 --num-workers 8."""


def quick(c: Common) -> Common:
    """--quick also keeps one seed (each script keeps a small grid)."""
    from dataclasses import replace

    return replace(c, seeds=c.seeds[:1])


def exp_dir(c: Common, name: str) -> str:
    return os.path.join(c.out_dir, name)


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def _write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


def _data_key(c: Common):
    from ffcv_ssl_common import fingerprint

    return [fingerprint(c.train_beton)["sha256"], fingerprint(c.val_beton)["sha256"]]


def run_cell(c: Common, name: str, method: str, flags: list[str], seed: int,
             heads: tuple[str, ...] = ("linear", "knn")) -> dict:
    """One training run and its probes (cached): {"method", "seed", "flags", "linear": {"test",
    "holdout"}, ..., "online": the last epoch's log record, "cell": its folder}."""
    flags = [str(f) for f in flags]
    cell = os.path.join(exp_dir(c, name), "cells", f"{method}-" + _key(
        method, c.recipe, flags, list(c.extra), seed, c.quick, _data_key(c)))
    record_path = os.path.join(cell, "cell.json")
    if os.path.exists(record_path):
        return json.load(open(record_path))
    cmd = ["bash", os.path.join(ROOT, "recipes", f"{c.recipe}.sh"), method,
           "--train-beton", c.train_beton, "--val-beton", c.val_beton,
           *(QUICK if c.quick else []), *flags, *c.extra, "--seed", str(seed), "--out-dir", cell]
    print(f"[{name}] {method} seed {seed}: {' '.join(flags)}", flush=True)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable})
    if done.returncode != 0:
        raise SystemExit(f"error: a run of {name} failed ({' '.join(cmd[2:])}): "
                         f"{(done.stderr.strip().splitlines() or ['no message'])[-1]}")
    log_path = os.path.join(cell, "log.jsonl")
    log = [json.loads(line) for line in open(log_path)] if os.path.exists(log_path) else []
    probed = probe_backbone(c, os.path.join(cell, "backbone.pt"), os.path.join(cell, "probe.json"),
                            heads)
    epochs = [r for r in log if "probe_acc" in r]  # none when --max-steps stopped it mid-epoch
    record = {"method": method, "seed": seed, "flags": flags, "command": cmd[2:], "cell": cell,
              "online": epochs[-1] if epochs else None, **probed}
    _write_json(record_path, record)
    return record


def probe_backbone(c: Common, backbone: str, out: str, heads=("linear", "knn"),
                   random_init_seed: int | None = None) -> dict:
    """probe.py in this process: {head: {"test": top-1 on the test split, "holdout": the chosen
    hyper-parameters' holdout top-1}}."""
    import probe

    args = probe.Args(backbone=backbone, train_beton=c.train_beton, val_beton=c.val_beton,
                      heads=tuple(heads), out=out,
                      train_subset=256 if c.quick else c.probe_train_subset,
                      epochs=2 if c.quick else 30, num_workers=1 if c.quick else 2,
                      random_init=random_init_seed is not None, seed=random_init_seed or 0)
    res = probe.main(args)
    return {h: {"test": res[h]["top1"], "holdout": res[h]["chosen"]["holdout_top1"]}
            for h in heads}


def random_init(c: Common, name: str, like: dict, heads=("linear", "knn")) -> list[dict]:
    """Probes of the network of cell `like` with random weights, one per seed (cached)."""
    meta = json.load(open(os.path.join(like["cell"], "backbone.json")))
    out = []
    for seed in c.seeds:
        path = os.path.join(exp_dir(c, name), "random_init",
                            _key(meta, list(heads), seed, c.quick, _data_key(c)) + ".json")
        if not os.path.exists(path):
            _write_json(path, probe_backbone(c, os.path.join(like["cell"], "backbone.pt"),
                                             path + ".probe.json", heads, random_init_seed=seed))
        out.append(json.load(open(path)))
    return out


def args_of(module, saved: dict):
    """A method file's Args from the settings a checkpoint saved (`settings(args)`)."""
    import ffcv_ssl_common as C

    def value(v):
        if isinstance(v, dict):
            return C.ViewConfig(**{k: value(x) for k, x in v.items()})
        return tuple(v) if isinstance(v, list) else v

    return C.with_settings(module.Args(), **{k: value(v) for k, v in saved.items()})


def values(records: list[dict], head: str = "linear", split: str = "test") -> list[float]:
    """Top-1 in percent, one per record."""
    return [100 * r[head][split] for r in records]


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def fmt(xs: list[float]) -> str:
    m, s = mean_sd(xs)
    return f"{m:.2f} ± {s:.2f}"


def differs(a: list[float], b: list[float]) -> bool:
    """A difference counts only when the two means are further apart than the two spreads
    together (standard deviations over seeds); else it is reported as inconclusive."""
    (ma, sa), (mb, sb) = mean_sd(a), mean_sd(b)
    return abs(ma - mb) > sa + sb


def best(configs: dict, head: str = "linear") -> str:
    """The configuration (key of {config: [records]}) with the best mean holdout top-1."""
    return max(configs, key=lambda k: statistics.mean(values(configs[k], head, "holdout")))


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                     if line.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown CPU"
    flags = set(open("/proc/cpuinfo").read().split()) if os.path.exists("/proc/cpuinfo") else set()
    return f"{model} ({os.cpu_count()} cores; " + ", ".join(
        f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) + ")"


def finish(c: Common, name: str, results: dict, table: str, verdict: str, plot) -> dict:
    """results.json, table.md (the table and the verdict) and <name>.png (`plot(ax_or_fig)`
    draws it) in the experiment's folder; prints the table and the verdict."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = exp_dir(c, name)
    header = (f"{name}: recipe {c.recipe}, seeds {', '.join(map(str, c.seeds))}, "
              f"{'QUICK (numbers mean nothing)' if c.quick else 'full'}; {cpu_name()}")
    _write_json(os.path.join(folder, "results.json"),
                {**results, "verdict": verdict, "header": header, "settings": vars(c)})
    text = f"{header}\n\n{table}\n\n**Verdict:** {verdict}\n"
    with open(os.path.join(folder, "table.md.tmp"), "w") as f:
        f.write(text)
    os.replace(os.path.join(folder, "table.md.tmp"), os.path.join(folder, "table.md"))
    fig = plot(plt)
    png = os.path.join(folder, f"{name}.png")
    fig.savefig(png + ".tmp.png", dpi=110, bbox_inches="tight")
    os.replace(png + ".tmp.png", png)
    plt.close(fig)
    print("\n" + text + f"\nwrote {folder}/results.json, table.md, {name}.png", flush=True)
    return results
