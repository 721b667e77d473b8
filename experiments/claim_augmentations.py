"""Claim 2 of Bordes et al. 2023: "strong data-augmentations are not always necessary":
cropping + grayscale is enough to reach competitive performances across SSL methods, grayscale
has the largest single effect, and blur and colour jitter add considerable time.

    python write_beton.py --dataset fashion-mnist-colour        # data/fashion-mnist-colour_*.beton
    python experiments/claim_augmentations.py                   # ~80 min on 2 cores
    python experiments/claim_augmentations.py --quick           # seconds: checks the script
    python experiments/claim_augmentations.py --recipe cifar10 \
        --train-beton data/cifar10_train.beton --val-beton data/cifar10_val.beton \
        --budget-min 30                                         # on a GPU

Fashion-MNIST is gray: grayscale and colour jitter do nothing there. The default data is
write_beton.py's fashion-mnist-colour, a synthetic variant whose random foreground and background
colours per image are unrelated to the class: two crops of one image share its colours, the
shortcut colour augmentations exist to remove. Each recipe trains SimCLR and VICReg with the CPU
recipe for the same wall-clock budget per run (the views' augmentations replaced), probed on the
test split once; the loader's time per epoch of each recipe is measured alone.
"""

import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Annotated

import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lab  # noqa: E402

# The recipes: flags for both views. "full" is the CPU recipe's views (crop 30-100%, flip, colour
# jitter 0.4/0.4/0.4/0.1 at p = 0.8, grayscale 0.2); the others take operations away from it.
NONE = {"flip-p": 0, "jitter-p": 0, "grayscale-p": 0, "blur-p": 0, "solarize-p": 0}
RECIPES = {
    "full": {},
    "crop only": NONE,
    "crop + grayscale": {**NONE, "grayscale-p": 0.2},
    "crop + jitter": {**NONE, "jitter-p": 0.8},
    "full - grayscale": {"grayscale-p": 0},
    "full - jitter": {"jitter-p": 0},
    "full + blur": {"blur-p": 0.5},
}


@dataclass
class Args:
    common: Annotated[lab.Common, tyro.conf.OmitArgPrefixes] = field(
        default_factory=lambda: lab.Common(train_beton="data/fashion-mnist-colour_train.beton",
                                           val_beton="data/fashion-mnist-colour_val.beton"))
    """What every experiment has."""
    methods: tuple[str, ...] = ("simclr", "vicreg")
    """Methods compared (the claim is across SSL methods)."""
    recipes: tuple[str, ...] = tuple(RECIPES)
    """Augmentation recipes, by name (see RECIPES in this file)."""
    budget_min: float = 2.0
    """Training minutes per run (--time-budget-min); every recipe gets the same."""


def view_flags(recipe: dict) -> list[str]:
    return [f for view in ("view1", "view2") for k, v in recipe.items()
            for f in (f"--{view}.{k}", str(v))]


def loader_seconds(c: lab.Common, recipe: dict, quick: bool) -> float:
    """One epoch of the training loader alone (two views, this recipe, batch 128)."""
    import ffcv_ssl_common as C

    view = C.ViewConfig(resolution=28, crop_scale=(0.3, 1.0), saturation=0.4,
                        **{k.replace("-", "_"): v for k, v in recipe.items()})
    loader = C.make_ssl_loader(c.train_beton, [view, view], 128, num_workers=2,
                               indices=C.subset_indices(c.train_beton, 256 if quick else 0))
    next(iter(loader))  # compile, warm up
    loader.close()
    start = time.time()
    for _ in loader:
        pass
    return time.time() - start


def main(args: Args) -> dict:
    if args.common.quick:  # one seed, one method, the four recipes the verdict needs
        args = replace(args, common=lab.quick(args.common), methods=args.methods[:1],
                       recipes=("full", "crop + grayscale", "full - grayscale", "full - jitter"))
    c = args.common
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        raise SystemExit(f"error: unknown recipe {unknown[0]!r} (choose among {list(RECIPES)})")
    if not os.path.exists(c.train_beton) and "fashion-mnist-colour" in c.train_beton:
        import write_beton  # the synthetic colour variant: seconds, from the Debian package

        write_beton.main(write_beton.Args(dataset="fashion-mnist-colour",
                                          out_dir=os.path.dirname(c.train_beton) or "."))
    budget = ["--time-budget-min", "0.05" if c.quick else f"{args.budget_min:g}"]
    cells = {(m, r): [lab.run_cell(c, "augmentations", m, view_flags(RECIPES[r]) + budget, s)
                      for s in c.seeds] for m in args.methods for r in args.recipes}
    baseline = lab.random_init(c, "augmentations", cells[(args.methods[0], args.recipes[0])][0])
    seconds = {r: loader_seconds(c, RECIPES[r], c.quick) for r in args.recipes}
    rows = ["| recipe | " + " | ".join(f"{m} linear (test)" for m in args.methods)
            + " | loader epoch (s) |", "|---|" + "---|" * (len(args.methods) + 1)]
    for r in args.recipes:
        rows.append(f"| {r} | " + " | ".join(lab.fmt(lab.values(cells[(m, r)]))
                                             for m in args.methods) + f" | {seconds[r]:.1f} |")
    rows.append("| random init | " + " | ".join(lab.fmt(lab.values(baseline))
                                                for _ in args.methods) + " | |")
    verdict = judge(args, cells, seconds)

    def plot(plt):
        fig, ax = plt.subplots(figsize=(9, 4))
        width = 0.8 / len(args.methods)
        for k, m in enumerate(args.methods):
            stats = [lab.mean_sd(lab.values(cells[(m, r)])) for r in args.recipes]
            ax.bar([i + k * width for i in range(len(args.recipes))], [s[0] for s in stats],
                   width, yerr=[s[1] for s in stats], label=m, capsize=3)
        ax.axhline(lab.mean_sd(lab.values(baseline))[0], color="gray", ls="--",
                   label="random init")
        ax.set_xticks([i + width * (len(args.methods) - 1) / 2 for i in range(len(args.recipes))],
                      args.recipes, rotation=20)
        ax.set(ylabel="linear probe, test top-1 (%)", title="Which augmentations matter")
        low = min(lab.mean_sd(lab.values(v))[0] for v in cells.values())
        ax.set_ylim(bottom=max(0, low - 5))
        ax.legend()
        return fig

    results = {"cells": {f"{m} | {r}": v for (m, r), v in cells.items()},
               "random_init": baseline, "loader_seconds": seconds}
    return lab.finish(c, "augmentations", results, "\n".join(rows), verdict, plot)


def judge(args: Args, cells: dict, seconds: dict) -> str:
    parts = []
    needed = {"full", "crop + grayscale", "full - grayscale", "full - jitter"}
    if not needed <= set(args.recipes):
        return "inconclusive: the recipes compared do not include " + ", ".join(
            sorted(needed - set(args.recipes)))
    for m in args.methods:
        full, cg = lab.values(cells[(m, "full")]), lab.values(cells[(m, "crop + grayscale")])
        gap = lab.mean_sd(full)[0] - lab.mean_sd(cg)[0]
        if not lab.differs(full, cg) or gap < 0:
            parts.append(f"{m}: crop + grayscale is level with the full recipe ({gap:+.2f})")
        else:
            parts.append(f"{m}: the full recipe is ahead of crop + grayscale by {gap:.2f} points")
        drops = {op: lab.mean_sd(full)[0] - lab.mean_sd(lab.values(cells[(m, f"full - {op}")]))[0]
                 for op in ("grayscale", "jitter")}
        largest = max(drops, key=drops.get)
        parts.append(f"removing {largest} costs most ({drops[largest]:+.2f})")
    slow = {r: seconds[r] / seconds["crop only"] for r in ("full", "full + blur")
            if r in seconds and "crop only" in seconds}
    claims = ("agrees" if all("level" in p for p in parts[::2]) else "disagrees") + " that crop + " \
        "grayscale is competitive"
    return (f"{claims} at this scale ({'; '.join(parts)}); loader time vs crop only: "
            + ", ".join(f"{r} {v:.2f}x" for r, v in slow.items())
            + ". A difference within the seeds' spread counts as level: two seeds of minutes "
              "each; ImageNet-scale runs (hundreds of epochs) would settle it.")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
