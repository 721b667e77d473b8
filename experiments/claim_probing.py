"""Claim 4 of Bordes et al. 2023, on evaluation: online and offline linear probes differ little;
"non linear probing results in a significant boost" but "can easily overfit on its training set";
"MLP only needs a few epochs". Read against raw pixels and random init, the baselines an MLP
probe must beat.

    python experiments/claim_probing.py                   # ~35 min on 2 cores
    python experiments/claim_probing.py --quick           # seconds: checks the script

SimCLR and VICReg train with the CPU recipe; probe.py fits linear and MLP heads (hyper-parameters
on a holdout of the training images, the test split once); an MLP head's accuracy on the images it
trains on and on the holdout is recorded every epoch; the same heads on raw pixels and on random
inits of the same network.
"""

import json
import os
import sys
from dataclasses import dataclass, field, replace
from typing import Annotated

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lab  # noqa: E402


@dataclass
class Args:
    common: Annotated[lab.Common, tyro.conf.OmitArgPrefixes] = field(default_factory=lab.Common)
    """What every experiment has."""
    methods: tuple[str, ...] = ("simclr", "vicreg")
    """Methods trained."""
    budget_min: float = 4.0
    """Training minutes per run (--time-budget-min)."""
    mlp_epochs: int = 60
    """Epochs of the MLP head whose train and holdout accuracy are followed."""


def split(n: int):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return order[n // 10:], order[:n // 10]  # fit, holdout (as probe.py's --holdout 0.1)


def mlp_curve(train_x, train_y, epochs: int, quick: bool) -> list[dict]:
    """An MLP head (probe.py's, lr 1e-2) on the fit split: train and holdout top-1 per epoch."""
    import probe

    fit, hold = split(len(train_y))
    args = probe.Args(epochs=2 if quick else epochs, batch_size=256)

    def batches():
        for part in fit[torch.randperm(len(fit))].split(args.batch_size):
            if len(part) >= 2:
                yield train_x[part], train_y[part]

    curve = []
    probe.train_head("mlp", args, train_x.shape[1], batches, train_x[hold], train_y[hold],
                     -(-len(fit) // args.batch_size), 1e-2, 5e-4, curve=curve,
                     train_xy=(train_x[fit], train_y[fit]))
    return curve


def pixel_probes(c: lab.Common) -> dict:
    """Linear and MLP heads on raw pixels (normalised, flattened), chosen on the holdout."""
    import ffcv_ssl_common as C
    import probe

    path = os.path.join(lab.exp_dir(c, "probing"), "pixels.json")
    if os.path.exists(path):
        return json.load(open(path))
    subset = C.subset_indices(c.train_beton, 256 if c.quick else c.probe_train_subset)
    data = {}
    for split_name, beton, idx in (("train", c.train_beton, subset), ("val", c.val_beton, None)):
        xs, ys = [], []
        for x, y in C.make_eval_loader(beton, 28, 512, indices=idx):
            xs.append(x.float().flatten(1).clone())
            ys.append(y.clone())
        data[split_name] = torch.cat(xs), torch.cat(ys)
    (tx, ty), (vx, vy) = data["train"], data["val"]
    fit, hold = split(len(ty))
    args = probe.Args(epochs=2 if c.quick else 30, batch_size=256)
    out = {}
    for head in ("linear", "mlp"):
        def batches(idx=fit):
            for part in idx[torch.randperm(len(idx))].split(args.batch_size):
                if len(part) >= 2:
                    yield tx[part], ty[part]
        lr = max(args.lr, key=lambda lr: probe.train_head(
            head, args, tx.shape[1], batches, tx[hold], ty[hold],
            -(-len(fit) // args.batch_size), lr, 5e-4)["top1"])
        everything = torch.arange(len(ty))
        res = probe.train_head(head, args, tx.shape[1], lambda: batches(everything), vx, vy,
                               -(-len(ty) // args.batch_size), lr, 5e-4)
        out[head] = {"test": res["top1"], "lr": lr}
    lab._write_json(path, out)
    return out


def main(args: Args) -> dict:
    if args.common.quick:
        args = replace(args, common=lab.quick(args.common), methods=args.methods[:1])
    c = args.common
    budget = ["--time-budget-min", "0.05" if c.quick else f"{args.budget_min:g}"]
    heads = ("linear", "mlp", "knn")
    cells = {m: [lab.run_cell(c, "probing", m, budget, s, heads=heads) for s in c.seeds]
             for m in args.methods}
    baseline = lab.random_init(c, "probing", cells[args.methods[0]][0], heads=heads)
    pixels = pixel_probes(c)
    curves = {}
    for m, runs in cells.items():
        cache = json.load(open(os.path.join(runs[0]["cell"], "probe.json")))["features_cache"]
        feats = torch.load(cache, weights_only=True)
        x, y = feats["train"]
        keep = y >= 0
        curves[m] = mlp_curve(x[keep], y[keep], args.mlp_epochs, c.quick)

    rows = ["| backbone | online linear (training views) | linear (test) | MLP (test) | "
            "k-NN (test) |", "|---|---|---|---|---|"]
    for m, runs in cells.items():
        online = [100 * r["online"]["probe_acc"] for r in runs]
        rows.append(f"| {m} | {lab.fmt(online)} | " + " | ".join(
            lab.fmt(lab.values(runs, h)) for h in heads) + " |")
    rows.append("| random init | | " + " | ".join(lab.fmt(lab.values(baseline, h))
                                              for h in heads) + " |")
    rows.append(f"| raw pixels | | {100 * pixels['linear']['test']:.2f} | "
                f"{100 * pixels['mlp']['test']:.2f} | |")
    rows.append("\nMLP head on the first seed's features (fit split / holdout, top-1 %): " +
                "; ".join(f"{m}: epoch 3 {100 * cv[min(2, len(cv) - 1)]['train_top1']:.1f} / "
                          f"{100 * cv[min(2, len(cv) - 1)]['val_top1']:.1f}, epoch {len(cv)} "
                          f"{100 * cv[-1]['train_top1']:.1f} / {100 * cv[-1]['val_top1']:.1f}"
                          for m, cv in curves.items()))
    verdict = judge(cells, baseline, pixels, curves)

    def plot(plt):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for m, cv in curves.items():
            e = [p["epoch"] for p in cv]
            axes[0].plot(e, [100 * p["train_top1"] for p in cv], label=f"{m}: fit split")
            axes[0].plot(e, [100 * p["val_top1"] for p in cv], "--", label=f"{m}: holdout")
        axes[0].set(xlabel="MLP head epochs", ylabel="top-1 (%)", title="The MLP probe overfits")
        axes[0].legend()
        names = [*cells, "random init", "raw pixels"]
        for k, h in enumerate(("linear", "mlp")):
            vals = [lab.mean_sd(lab.values(cells[m], h))[0] for m in cells] + [
                lab.mean_sd(lab.values(baseline, h))[0], 100 * pixels[h]["test"]]
            axes[1].bar([i + 0.4 * k for i in range(len(names))], vals, 0.4, label=h)
        axes[1].set_xticks([i + 0.2 for i in range(len(names))], names)
        axes[1].set(ylabel="test top-1 (%)", title="Linear vs MLP probes")
        axes[1].set_ylim(bottom=60)
        axes[1].legend()
        return fig

    results = {"cells": cells, "random_init": baseline, "pixels": pixels, "mlp_curves": curves}
    return lab.finish(c, "probing", results, "\n".join(rows), verdict, plot)


def judge(cells, baseline, pixels, curves) -> str:
    parts = []
    for m, runs in cells.items():
        lin, mlp = lab.values(runs, "linear"), lab.values(runs, "mlp")
        online = [100 * r["online"]["probe_acc"] for r in runs]
        parts.append(f"{m}: MLP {lab.mean_sd(mlp)[0] - lab.mean_sd(lin)[0]:+.2f} over linear"
                     f"{'' if lab.differs(mlp, lin) else ' (within the spread)'}, online "
                     f"{lab.mean_sd(online)[0] - lab.mean_sd(lin)[0]:+.2f} vs offline linear")
        cv = curves[m]
        gap = 100 * (cv[-1]["train_top1"] - cv[-1]["val_top1"])
        few = 100 * (cv[-1]["val_top1"] - cv[min(2, len(cv) - 1)]["val_top1"])
        parts.append(f"its MLP head ends {gap:.1f} points above its holdout on the images it fits "
                     f"(overfitting), and gains {few:+.1f} on the holdout after epoch 3")
    boost = all(lab.differs(lab.values(r, "mlp"), lab.values(r, "linear")) and
                lab.mean_sd(lab.values(r, "mlp"))[0] > lab.mean_sd(lab.values(r, "linear"))[0]
                for r in cells.values())
    return (("agrees" if boost else "inconclusive") + " that the MLP probe gives a boost; "
            + "; ".join(parts) + f". Baselines: raw pixels {100 * pixels['linear']['test']:.1f} "
            f"linear / {100 * pixels['mlp']['test']:.1f} MLP, random init "
            f"{lab.mean_sd(lab.values(baseline, 'mlp'))[0]:.1f} MLP: on Fashion-MNIST an MLP on "
            f"pixels is a strong baseline, so the boost says little about the representation "
            f"here. The online probe reads training views (augmented), the offline one centre "
            f"crops. A harder data set (CIFAR-10, ImageNet-100) would settle it.")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
