"""Claim 1 of Bordes et al. 2023: "SimCLR can perform equally well with small or large
mini-batch training" once the learning rate and temperature are tuned per batch size (and "the
optimal temperature might not be the same depending on the batch size").

    python experiments/claim_batch_size.py                  # ~140 min on 2 cores
    python experiments/claim_batch_size.py --quick          # seconds: checks the script
    python experiments/claim_batch_size.py --batch-sizes 64 256 1024 --recipe cifar10 \
        --train-beton data/cifar10_train.beton --val-beton data/cifar10_val.beton \
        --epochs 100                                        # on a GPU

Every run sees the same images (--epochs of the training set): the comparison is at equal images
seen, not equal time; each row also gives the minutes the runs took. SimCLR's grid (base lr x
temperature) runs with the first seed; the configuration with the best holdout score per batch
size ("tuned") and the best one at the middle batch size used for all ("one setting") are run
with every seed and reported on the test split. Barlow Twins runs at its recipe's settings at each
batch size, for comparison.
"""

import os
import sys
from dataclasses import dataclass, field, replace
from typing import Annotated

import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lab  # noqa: E402


@dataclass
class Args:
    common: Annotated[lab.Common, tyro.conf.OmitArgPrefixes] = field(default_factory=lab.Common)
    """What every experiment has."""
    batch_sizes: tuple[int, ...] = (32, 128, 512)
    """Global batch sizes compared."""
    base_lrs: tuple[float, ...] = (4e-3, 1.6e-2)
    """SimCLR's base learning rates tried (peak = base x batch / 256, the recipe's AdamW)."""
    temperatures: tuple[float, ...] = (0.1, 0.3)
    """SimCLR's temperatures tried."""
    barlow_batch_sizes: tuple[int, ...] = (32, 512)
    """Barlow Twins' batch sizes (its recipe's other settings); empty: none."""
    epochs: int = 1
    """Passes over the training set per run: every batch size sees the same images."""


def main(args: Args) -> dict:
    if args.common.quick:
        args = replace(args, common=lab.quick(args.common), batch_sizes=(16, 32), base_lrs=(8e-3,),
                       temperatures=(0.1, 0.3), barlow_batch_sizes=(32,))
    c = args.common
    budget = ["--epochs", str(args.epochs), "--warmup-epochs", "0" if c.quick else "0.03"]

    def cell(method, batch, extra, seed):
        return lab.run_cell(c, "batch_size", method, ["--batch-size", batch, *extra, *budget],
                            seed)

    configs = [(lr, t) for lr in args.base_lrs for t in args.temperatures]
    grid = {(b, cfg): [cell("simclr", b, ["--base-lr", cfg[0], "--temperature", cfg[1]],
                            c.seeds[0])] for b in args.batch_sizes for cfg in configs}
    tuned = {b: lab.best({cfg: grid[(b, cfg)] for cfg in configs}) for b in args.batch_sizes}
    middle = args.batch_sizes[len(args.batch_sizes) // 2]
    one = tuned[middle]

    def seeds(b, cfg):
        return [cell("simclr", b, ["--base-lr", cfg[0], "--temperature", cfg[1]], s)
                for s in c.seeds]

    tuned_runs = {b: seeds(b, tuned[b]) for b in args.batch_sizes}
    one_runs = {b: seeds(b, one) for b in args.batch_sizes}
    barlow = {b: [cell("barlowtwins", b, [], s) for s in c.seeds] for b in args.barlow_batch_sizes}
    baseline = lab.random_init(c, "batch_size", tuned_runs[middle][0])

    minutes = {b: lab.mean_sd([r["online"]["train_min"] for r in tuned_runs[b]])[0]
               for b in args.batch_sizes}
    rows = ["| batch | SimCLR tuned per batch (lr, tau) | SimCLR, one setting " + str(one)
            + " | Barlow Twins | train minutes (tuned) |", "|---|---|---|---|---|"]
    for b in args.batch_sizes:
        bt = lab.fmt(lab.values(barlow[b])) if b in barlow else ""
        rows.append(f"| {b} | {lab.fmt(lab.values(tuned_runs[b]))} {tuned[b]} | "
                    f"{lab.fmt(lab.values(one_runs[b]))} | {bt} | {minutes[b]:.1f} |")
    rows.append(f"| random init | {lab.fmt(lab.values(baseline))} | | | |")
    rows.append("\nThe grid's holdout scores (first seed; linear probe, %): " + "; ".join(
        f"batch {b} {cfg}: {100 * grid[(b, cfg)][0]['linear']['holdout']:.2f}"
        for b in args.batch_sizes for cfg in configs))
    verdict = judge(args, tuned, tuned_runs, one_runs, minutes)

    def plot(plt):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        xs = list(args.batch_sizes)
        for label, runs in (("SimCLR, tuned per batch", tuned_runs),
                            (f"SimCLR, one setting {one}", one_runs)):
            stats = [lab.mean_sd(lab.values(runs[b])) for b in xs]
            ax.errorbar(xs, [s[0] for s in stats], [s[1] for s in stats], marker="o",
                        capsize=3, label=label)
        if barlow:
            stats = [lab.mean_sd(lab.values(barlow[b])) for b in barlow]
            ax.errorbar(list(barlow), [s[0] for s in stats], [s[1] for s in stats], marker="s",
                        capsize=3, label="Barlow Twins")
        ax.axhline(lab.mean_sd(lab.values(baseline))[0], color="gray", ls="--",
                   label="random init")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="batch size (equal images seen)", ylabel="linear probe, test top-1 (%)",
               title="Batch size")
        ax.legend()
        return fig

    results = {"grid": {f"{b} {cfg}": v for (b, cfg), v in grid.items()},
               "tuned": {str(b): {"config": tuned[b], "runs": tuned_runs[b]} for b in tuned},
               "one_setting": {"config": one, "runs": {str(b): v for b, v in one_runs.items()}},
               "barlowtwins": {str(b): v for b, v in barlow.items()}, "random_init": baseline}
    return lab.finish(c, "batch_size", results, "\n".join(rows), verdict, plot)


def judge(args, tuned, tuned_runs, one_runs, minutes) -> str:
    top = max(args.batch_sizes, key=lambda b: lab.mean_sd(lab.values(tuned_runs[b]))[0])
    behind = [b for b in args.batch_sizes
              if lab.differs(lab.values(tuned_runs[b]), lab.values(tuned_runs[top]))]
    temps = {b: tuned[b][1] for b in args.batch_sizes}
    small, large = args.batch_sizes[0], args.batch_sizes[-1]
    gap_tuned = (lab.mean_sd(lab.values(tuned_runs[large]))[0]
                 - lab.mean_sd(lab.values(tuned_runs[small]))[0])
    gap_one = (lab.mean_sd(lab.values(one_runs[large]))[0]
               - lab.mean_sd(lab.values(one_runs[small]))[0])
    head = ("agrees" if not behind else "disagrees") + (
        f": tuned per batch size, no batch size is behind the best ({top}) by more than the seeds'"
        f" spread" if not behind else f": tuned per batch size, batch(es) {behind} stay behind "
                                      f"{top}")
    return (f"{head}; large minus small batch: {gap_tuned:+.2f} points tuned, {gap_one:+.2f} "
            f"with one setting; the chosen temperatures per batch: {temps}; at equal images the "
            f"runs took {', '.join(f'{m:.1f}' for m in minutes.values())} minutes (batch "
            f"{', '.join(map(str, minutes))}), so equal wall-clock favours the faster batch. "
            f"One epoch of Fashion-MNIST on a CPU is far from the paper's setting; the projector "
            f"depth's effect on small batches was not measured here. Hundreds of epochs on "
            f"CIFAR-10 or ImageNet-100 would settle it.")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
