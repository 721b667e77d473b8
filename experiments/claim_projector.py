"""Claim 3 of Bordes et al. 2023: "projector architecture is important for performance".

    python experiments/claim_projector.py                  # ~80 min on 2 cores
    python experiments/claim_projector.py --quick          # seconds: checks the script

SimCLR and VICReg with projectors of depth 0 (none: the loss on the backbone's features) to 3 at
one width, and of two other widths at depth 2, each for the same wall-clock budget per run; a
linear probe on the backbone (the usual evaluation) and on every projector layer's output (after
each hidden layer's ReLU, and the last layer), to show where class information is lost.
"""

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
    """Methods compared."""
    depths: tuple[int, ...] = (0, 1, 2, 3)
    """Projector depths (Linear layers) at --width."""
    width: int = 512
    """Every layer's width for the depth sweep."""
    widths: tuple[int, ...] = (128, 2048)
    """Other widths, at depth 2."""
    budget_min: float = 2.0
    """Training minutes per run (--time-budget-min)."""


def dims(depth: int, width: int) -> list[str]:
    return ["--projector-dims", *[str(width)] * depth] if depth else ["--projector-dims"]


CLASSES = {"simclr": "SimCLR", "barlowtwins": "BarlowTwins", "vicreg": "VICReg",
           "instance_simclr": "InstanceSimCLR"}


@torch.no_grad()
def features(model, loader) -> tuple[list, "torch.Tensor"]:
    """The backbone's features and each projector layer's output (after each hidden layer's
    ReLU, and the last layer's), for every image of the loader."""
    outs, labels = None, []
    for x, y in loader:
        z = model.backbone(x)
        seen = [z]
        for k, layer in enumerate(model.projector):
            z = layer(z)
            if isinstance(layer, torch.nn.ReLU) or k == len(model.projector) - 1:
                seen.append(z)
        outs = [[t.float().clone()] for t in seen] if outs is None else [
            o + [t.float().clone()] for o, t in zip(outs, seen)]
        labels.append(y.clone())
    return [torch.cat(o) for o in outs], torch.cat(labels)


def layer_probes(c: lab.Common, record: dict) -> list[float]:
    """Linear-probe test top-1 of the backbone's features and of each projector layer's output,
    from the run's checkpoint (the whole model; the export is the backbone alone), the learning
    rate chosen on a seeded tenth of the training images."""
    import importlib
    import json

    import ffcv_ssl_common as C
    import probe

    path = os.path.join(record["cell"], "layers.json")
    if os.path.exists(path):
        return json.load(open(path))
    m = importlib.import_module(record["method"])
    saved = os.path.join(record["cell"], "checkpoint.pt")
    ckpt = torch.load(saved, map_location="cpu", weights_only=True)
    model = getattr(m, CLASSES[record["method"]])(lab.args_of(m, ckpt["args"]),
                                                  ckpt["resolved"]["stem"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    resolution = json.load(open(os.path.join(record["cell"], "backbone.json")))["resolution"]
    subset = C.subset_indices(c.train_beton, 256 if c.quick else c.probe_train_subset)
    train = features(model, C.make_eval_loader(c.train_beton, resolution, 512, indices=subset))
    val = features(model, C.make_eval_loader(c.val_beton, resolution, 512))
    pargs = probe.Args(epochs=2 if c.quick else 20, batch_size=256)
    order = torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(0))
    hold, fit = order[:len(order) // 10], order[len(order) // 10:]
    scores = []
    for (x, y), (vx, vy) in zip(((t, train[1]) for t in train[0]),
                                ((t, val[1]) for t in val[0])):
        def batches(x=x, y=y, idx=fit):
            for part in idx[torch.randperm(len(idx))].split(pargs.batch_size):
                if len(part) >= 2:
                    yield x[part], y[part]
        steps = -(-len(fit) // pargs.batch_size)
        chosen = max(pargs.lr, key=lambda lr: probe.train_head(
            "linear", pargs, x.shape[1], batches, x[hold], y[hold], steps, lr, 5e-4)["top1"])
        every = lambda x=x, y=y: batches(x, y, order)  # noqa: E731 - all training images
        scores.append(probe.train_head("linear", pargs, x.shape[1], every, vx, vy,
                                       -(-len(order) // pargs.batch_size), chosen, 5e-4)["top1"])
    lab._write_json(path, scores)
    return scores


def main(args: Args) -> dict:
    if args.common.quick:
        args = replace(args, common=lab.quick(args.common), methods=args.methods[:1],
                       depths=(0, 2), widths=(64,), width=32)
    c = args.common
    budget = ["--time-budget-min", "0.05" if c.quick else f"{args.budget_min:g}"]
    shapes = [(d, args.width) for d in args.depths] + [(2, w) for w in args.widths]
    cells = {(m, d, w): [lab.run_cell(c, "projector", m, dims(d, w) + budget, s)
                         for s in c.seeds] for m in args.methods for d, w in shapes}
    layers = {k: [layer_probes(c, r) for r in v] for k, v in cells.items()}
    baseline = lab.random_init(c, "projector", cells[(args.methods[0], *shapes[0])][0])

    rows = ["| method | projector | backbone (linear, test) | each layer's output: linear, "
            "test (mean over seeds) |", "|---|---|---|---|"]
    for (m, d, w), runs in cells.items():
        per_layer = [sum(x[k] for x in layers[(m, d, w)]) / len(runs) for k in
                     range(1, d + 1)]
        name = "none" if d == 0 else "-".join([str(w)] * d)
        rows.append(f"| {m} | {name} | {lab.fmt(lab.values(runs))} | "
                    + " / ".join(f"{100 * v:.2f}" for v in per_layer) + " |")
    rows.append(f"| random init | | {lab.fmt(lab.values(baseline))} | |")
    verdict = judge(args, cells, layers)

    def plot(plt):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for m in args.methods:
            stats = [lab.mean_sd(lab.values(cells[(m, d, args.width)])) for d in args.depths]
            axes[0].errorbar(args.depths, [s[0] for s in stats], [s[1] for s in stats],
                             marker="o", capsize=3, label=m)
            deepest = max(args.depths)
            curve = [sum(x[k] for x in layers[(m, deepest, args.width)]) / len(c.seeds) * 100
                     for k in range(deepest + 1)]
            axes[1].plot(range(deepest + 1), curve, marker="o", label=f"{m}, depth {deepest}")
        axes[0].axhline(lab.mean_sd(lab.values(baseline))[0], color="gray", ls="--",
                        label="random init")
        axes[0].set(xlabel=f"projector depth (width {args.width})",
                    ylabel="linear probe on the backbone, test (%)", title="Projector depth")
        axes[1].set(xlabel="layer (0: backbone, k: after projector layer k)",
                    ylabel="linear probe, test (%)", title="Where class information is lost")
        for ax in axes:
            ax.legend()
        return fig

    results = {"cells": {f"{m} depth {d} width {w}": v for (m, d, w), v in cells.items()},
               "layers": {f"{m} depth {d} width {w}": v for (m, d, w), v in layers.items()},
               "random_init": baseline}
    return lab.finish(c, "projector", results, "\n".join(rows), verdict, plot)


def judge(args, cells, layers) -> str:
    parts = []
    for m in args.methods:
        by_depth = {d: lab.values(cells[(m, d, args.width)]) for d in args.depths}
        top = max(by_depth, key=lambda d: lab.mean_sd(by_depth[d])[0])
        worse = [d for d in by_depth if lab.differs(by_depth[d], by_depth[top])]
        parts.append(f"{m}: best depth {top} ({lab.fmt(by_depth[top])}), clearly worse: "
                     f"{worse or 'none'}")
    matters = any("none" not in p.split("clearly worse: ")[1] for p in parts)
    return (("agrees" if matters else "inconclusive") + " at this scale: " + "; ".join(parts)
            + ". The linear probe falls along the projector's layers (table), the backbone keeps "
              "more class information than the embedding the loss sees. A few minutes per run; "
              "the paper's runs last hundreds of epochs.")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
