"""benchmarks/bench_epoch.py: its timing counts one whole epoch of steps after the warm-up, feeds
both loaders' batches to the step in the same form, and the script runs end to end on the CPU."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import bench_epoch  # noqa: E402


def test_timed_epoch_steps_on_every_batch_of_one_epoch_after_the_warm_up():
    cpu = torch.device("cpu")
    ours = [(torch.full((4, 3, 8, 8), float(k)), torch.zeros(4, 3, 8, 8), torch.arange(4))
            for k in range(5)]
    torchvision = [((torch.full((4, 3, 8, 8), float(k)), torch.zeros(4, 3, 8, 8)),
                    torch.arange(4)) for k in range(5)]
    for loader in (ours, torchvision):
        seen = []

        def step(x1, x2, y):
            assert x1.is_contiguous(memory_format=torch.channels_last) or loader is ours
            seen.append(int(x1[0, 0, 0, 0]))
            return y.float()

        rate = bench_epoch.timed_epoch(loader, cpu, step, warmup_batches=2)
        assert seen == [0, 1, 0, 1, 2, 3, 4]  # two warm-up batches, then the whole epoch
        assert rate > 0
        seen.clear()
        assert bench_epoch.timed_epoch(loader, cpu, None, warmup_batches=2) > 0
        assert seen == []  # the loader alone: no step


def test_bench_epoch_runs_end_to_end_on_the_cpu(tmp_path):
    args = bench_epoch.Args(num_images=48, arch="resnet18", resolution=32, batch_size=16,
                            num_workers=1, device="cpu", precision="fp32", warmup_batches=1,
                            work_dir=str(tmp_path), out=str(tmp_path / "epoch.json"))
    results = bench_epoch.main(args)
    rows = results["rows"]
    assert set(rows) == {"model alone", "ours, loader alone", "ours, training",
                         "torchvision, loader alone", "torchvision, training"}
    assert all(value > 0 for value in rows.values())
    assert results["speedup"] == pytest.approx(rows["ours, training"]
                                               / rows["torchvision, training"])
    assert json.load(open(tmp_path / "epoch.json"))["rows"] == rows
    table = open(tmp_path / "epoch.md").read()
    assert f"**{results['speedup']:.2f}x**" in table and "resnet18" in table
    with pytest.raises(SystemExit, match="three batches"):
        bench_epoch.main(bench_epoch.Args(num_images=40, batch_size=16, work_dir=str(tmp_path)))
