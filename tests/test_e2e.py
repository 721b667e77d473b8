"""End to end on the tiny .beton the tests write: simclr.py trains a few steps on the CPU, saves a
checkpoint, resumes exactly, exports a backbone that torchvision loads strictly, probe.py
evaluates it (and a random init), and torchrun runs it with 2 CPU processes."""

import json
import os

import pytest
import torch

from conftest import load_exported_resnet18, run_method

TINY = ["--epochs", "2", "--batch-size", "64", "--projector-dims", "64", "32",
        "--view1.resolution", "16", "--view2.resolution", "16", "--warmup-epochs", "0.5",
        "--num-workers", "1", "--device", "cpu"]


def simclr(betons, out_dir, *extra, check=True, torchrun=False):
    return run_method("simclr.py", betons, out_dir, *TINY, *extra, check=check,
                      torchrun=torchrun)


@pytest.fixture(scope="module")
def straight(betons, tmp_path_factory):
    """Two epochs in one go."""
    out = tmp_path_factory.mktemp("straight")
    simclr(betons, out)
    return out


def test_run_writes_logs_checkpoint_and_backbone(straight):
    names = set(os.listdir(straight))
    assert {"args.json", "log.jsonl", "checkpoint.pt", "backbone.pt", "backbone.json",
            "curves.png"} <= names
    assert not [n for n in names if ".tmp" in n]
    epochs = [json.loads(line) for line in open(straight / "log.jsonl") if "probe_acc" in line]
    assert [e["epoch"] for e in epochs] == [1, 2]
    for e in epochs:
        assert math_finite(e["loss"]) and 0 <= e["probe_acc"] <= 1 and e["images_per_s"] > 0
    ckpt = torch.load(straight / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 10  # 320 images / 64 = 5 steps per epoch
    assert ckpt["args"]["batch_size"] == 64


def math_finite(x):
    return x == x and abs(x) != float("inf")


def test_exported_backbone_loads_into_torchvision(straight):
    meta = json.load(open(straight / "backbone.json"))
    assert meta == {"arch": "resnet18", "small_stem": True, "resolution": 16, "method": "simclr"}
    net = load_exported_resnet18(straight / "backbone.pt")
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 512)


def test_resume_continues_exactly(betons, straight, tmp_path):
    # Stop after epoch 1 (as an interrupted run would, with its checkpoint), then resume.
    simclr(betons, tmp_path, "--max-steps", "5")
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1
    run = simclr(betons, tmp_path)
    assert "resumed from" in run.stdout and "at epoch 1" in run.stdout
    import simclr as module  # --precision auto, resolved for this CPU and printed

    assert f'"bf16": {json.dumps(module.bf16_is_fast(torch.device("cpu")))}' in run.stdout
    a = torch.load(straight / "backbone.pt", weights_only=True)
    b = torch.load(tmp_path / "backbone.pt", weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl") if "probe_acc" in line]
    ref = [json.loads(line) for line in open(straight / "log.jsonl") if "probe_acc" in line]
    assert [r["epoch"] for r in log] == [1, 2]
    assert log[1]["loss"] == pytest.approx(ref[1]["loss"], rel=1e-4)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(betons, tmp_path):
    simclr(betons, tmp_path, "--max-steps", "5")
    run = simclr(betons, tmp_path, "--optimizer", "sgd", check=False)
    assert run.returncode == 1 and "trained with --optimizer lars, not sgd" in run.stderr
    run = simclr(betons, tmp_path, "--base-lr", "1e30", check=False)
    assert run.returncode == 1
    assert "loss is nan" in run.stderr.lower() or "loss is inf" in run.stderr.lower()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_bad_input_gives_one_line_errors(betons, tmp_path):
    run = simclr({"train": str(tmp_path / "missing.beton"), "val": betons["val"]}, tmp_path,
                 check=False)
    assert run.returncode == 1 and "missing.beton: no such .beton file" in run.stderr
    run = simclr(betons, tmp_path, "--arch", "resnet7", check=False)
    assert run.returncode == 1 and "unknown architecture 'resnet7'" in run.stderr


def test_probe_on_the_export_and_on_random_init(betons, straight):
    import probe

    common = dict(backbone=str(straight / "backbone.pt"), train_beton=betons["train"],
                  val_beton=betons["val"], epochs=20, num_workers=1, device="cpu")
    trained = probe.main(probe.Args(**common))
    baseline = probe.main(probe.Args(**common, random_init=True))
    for res in (trained, baseline):
        assert res["resolution"] == 16 and res["train_images"] == 320 and res["val_images"] == 100
        for head in ("linear", "mlp", "knn"):
            assert 0 <= res[head]["top1"] <= res[head]["top5"] <= 1
    # The tiny data's labels are its brightness level: some head does far better than chance
    # (0.1) on either. (Cosine k-NN ignores the features' scale, much of what random features
    # keep of brightness; which backbone wins is the Fashion-MNIST benchmark's business.)
    for res in (trained, baseline):
        assert max(res[h]["top1"] for h in ("linear", "mlp", "knn")) > 0.3
    assert os.path.exists(straight / "probe_backbone.json")
    assert os.path.exists(straight / "probe_random_init.json")
    # The features were cached: a second run does not extract again and gives the same k-NN.
    again = probe.main(probe.Args(**common, heads=("knn",)))
    assert again["knn"] == trained["knn"] and again["seconds"] < trained["seconds"]


def test_probe_on_augmented_views(betons, straight, tmp_path):
    import probe

    res = probe.main(probe.Args(backbone=str(straight / "backbone.pt"), train_beton=betons["train"],
                                val_beton=betons["val"], heads=("linear",), epochs=2,
                                augment=True, batch_size=64, num_workers=1, device="cpu",
                                out=str(tmp_path / "aug.json")))
    assert res["augment"] and 0 <= res["linear"]["top1"] <= 1
    assert (tmp_path / "aug.json").exists()


def test_probe_refuses_a_backbone_of_another_architecture(straight, betons):
    import probe

    with pytest.raises(ValueError, match="does not fit resnet34"):
        probe.main(probe.Args(backbone=str(straight / "backbone.pt"), arch="resnet34",
                              train_beton=betons["train"], val_beton=betons["val"]))


def test_torchrun_two_cpu_processes(betons, tmp_path):
    run = simclr(betons, tmp_path, "--max-steps", "2", torchrun=True)
    assert '"world": 2' in run.stdout
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2
