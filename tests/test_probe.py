"""probe.py on an exported backbone and on a random init: heads, feature cache, the network built
from backbone.json, damaged or foreign backbones refused in one line, unlabelled images left
out, and a clean exit (numba once printed a KeyError traceback when a loader was collected)."""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import probe
from conftest import ROOT, run_method


def common(straight, betons, **kw):
    return {**dict(backbone=str(straight("simclr.py") / "backbone.pt"),
                   train_beton=betons["train"], val_beton=betons["val"], epochs=20,
                   num_workers=1, device="cpu"), **kw}


@pytest.fixture(scope="module")
def larger_train(tmp_path_factory):
    """60,000 noise images of 28 px (Fashion-MNIST's size; written in seconds): the conditions in
    which numba's finaliser error showed, reproducibly, before the fix."""
    import write_beton
    from conftest import write_idx

    d = tmp_path_factory.mktemp("larger")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60000), ("t10k", 20)):
        write_idx(d / f"{prefix}-images-idx3-ubyte.gz",
                  rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    write_beton.main(write_beton.Args(data_dir=str(d), out_dir=str(d), name="larger",
                                      num_workers=1))
    return str(d / "larger_train.beton")


def test_probe_as_a_process_exits_cleanly(betons, straight, larger_train):
    """numba's finaliser printed "Exception ignored in: <finalize object ...> KeyError" with a
    traceback whenever a loader of several batches was garbage-collected (here: once the
    training features are extracted). A user reads that as a crash."""
    args = common(straight, betons, heads="knn", train_beton=larger_train, num_workers=2,
                  train_subset=1100)
    cmd = [sys.executable, "probe.py", *[f"--{k.replace('_', '-')}={v}" for k, v in args.items()]]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr


def test_probe_on_the_export_and_on_random_init(betons, straight):
    args = common(straight, betons)
    trained = probe.main(probe.Args(**args))
    baseline = probe.main(probe.Args(**args, random_init=True))
    for res in (trained, baseline):
        assert res["resolution"] == 16 and res["train_images"] == 320 and res["val_images"] == 100
        assert res["small_stem"]
        for head in ("linear", "mlp", "knn"):
            assert res[head]["top1"] <= res[head]["top5"]  # 10 classes: top-5 is reported
    # The tiny data's labels are its brightness level: some head does far better than chance
    # (0.1) on either. (Which backbone wins is the Fashion-MNIST benchmark's business.)
    for res in (trained, baseline):
        assert max(res[h]["top1"] for h in ("linear", "mlp", "knn")) > 0.3
    out = straight("simclr.py")
    assert (out / "probe_backbone.json").exists()
    assert (out / "probe_random_init_seed0.json").exists()
    other = probe.main(probe.Args(**args, random_init=True, seed=1, heads=("knn",)))
    assert (out / "probe_random_init_seed1.json").exists()  # side by side, nothing overwritten
    assert (out / "probe_random_init_seed0.json").exists() and other["knn"] != baseline["knn"]
    again = probe.main(probe.Args(**args, heads=("knn",)))  # cached: same features, same k-NN
    assert again["knn"] == trained["knn"]


def test_a_narrower_resnet_from_training_to_probe(betons, tmp_path):
    """--width 32: the method file trains a ScaledResNet, backbone.json records the width, and
    probe.py rebuilds the same network from it (trained weights loaded strictly, and a random
    init of the same width) without being told."""
    out = tmp_path / "narrow"
    run_method("vicreg.py", betons, out, "--width", "32", "--epochs", "1")
    import json

    assert json.load(open(out / "backbone.json"))["width"] == 32
    state = torch.load(out / "backbone.pt", weights_only=True)
    assert state["conv1.weight"].shape == (32, 3, 3, 3)
    assert state["layer4.1.conv2.weight"].shape == (256, 256, 3, 3)
    args = dict(backbone=str(out / "backbone.pt"), train_beton=betons["train"],
                val_beton=betons["val"], epochs=5, num_workers=1, device="cpu",
                heads=("linear", "knn"))
    for res in (probe.main(probe.Args(**args)), probe.main(probe.Args(**args, random_init=True))):
        assert res["width"] == 32 and res["small_stem"]
        assert max(res[h]["top1"] for h in ("linear", "knn")) > 0.3  # far above chance (0.1)
    with pytest.raises(ValueError, match="does not fit resnet18 \\(width 64"):
        probe.main(probe.Args(**args, width=64))  # told otherwise: one line, not a traceback


def test_top5_only_with_more_than_five_classes():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    assert probe.topk(logits, torch.tensor([0, 2])) == {"top1": 0.5}
    many = torch.arange(14.0).view(2, 7)
    assert probe.topk(many, torch.tensor([6, 0])) == {"top1": 0.5, "top5": 0.5}


def test_augment_chooses_and_fits_the_heads_on_augmented_views(betons, straight, tmp_path,
                                                               monkeypatch):
    """With --augment every head trained (each candidate on the holdout's fit split, then the
    chosen one) sees features of random crops + flips, not the cached centre crops' features;
    without it, exactly those."""
    seen = []
    real = probe.train_head

    def spy(kind, args, width, batches, *rest, **kw):
        seen.append(next(iter(batches()))[0].cpu())
        return real(kind, args, width, batches, *rest, **kw)

    monkeypatch.setattr(probe, "train_head", spy)
    base = common(straight, betons, heads=("linear",), batch_size=64, epochs=2, lr=(1e-3, 3e-2))
    for augment in (False, True):
        seen.clear()
        res = probe.main(probe.Args(**base, augment=augment,
                                    out=str(tmp_path / f"{augment}.json")))
        centre = torch.load(res["features_cache"], weights_only=True)["train"][0]
        assert len(seen) == 3 and len(res["linear"]["chosen"]["holdout_grid"]) == 2
        for batch in seen:  # which rows are, exactly, some image's centre-crop features
            cached = (batch[:, None, :] == centre[None]).all(-1).any(1)
            if augment:
                assert cached.float().mean() < 0.2
            else:
                assert cached.all()


def test_plain_state_dict_with_arch_and_stem(betons, straight, tmp_path):
    shutil.copy(straight("simclr.py") / "backbone.pt", tmp_path / "weights.pt")  # no json beside
    args = common(straight, betons, heads=("knn",), resolution=16)
    args["backbone"] = str(tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="give --arch"):
        probe.main(probe.Args(**args))
    with pytest.raises(ValueError, match="does not fit resnet18 \\(width 64, small stem: False\\)"):
        probe.main(probe.Args(**args, arch="resnet18", stem="imagenet"))
    res = probe.main(probe.Args(**args, arch="resnet18", stem="small"))
    assert res["small_stem"] and res["knn"]["top1"] > 0.3


class RunsCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("damage", ["truncated", "code", "tensor", "other_arch"])
def test_damaged_or_foreign_backbones(betons, straight, tmp_path, damage):
    shutil.copy(straight("simclr.py") / "backbone.json", tmp_path / "backbone.json")
    path, marker = tmp_path / "backbone.pt", tmp_path / "pwned"
    good = (straight("simclr.py") / "backbone.pt").read_bytes()
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "code":
        torch.save({"conv1.weight": RunsCode(str(marker))}, path)
    elif damage == "tensor":
        torch.save(torch.zeros(3), path)
    else:
        path.write_bytes(good)
    args = common(straight, betons)
    args["backbone"] = str(path)
    arch = "resnet34" if damage == "other_arch" else None
    with pytest.raises(ValueError) as err:
        probe.main(probe.Args(**args, arch=arch))
    assert "\n" not in str(err.value) and not marker.exists()
    expected = {"truncated": "cannot be loaded", "code": "cannot be loaded",
                "tensor": "not a state dict", "other_arch": "does not fit resnet34"}[damage]
    assert expected in str(err.value)


@pytest.mark.parametrize("meta,says", [
    ([1, 2], "holds a list, not an object"),
    ({"arch": "resnet18", "stem": "small"}, "has a bad 'stem': 'small'"),
    ({"arch": "resnet18", "stem": {"conv1": 3, "maxpool": False}}, "has a bad 'stem'"),
    ({"arch": "resnet18", "resolution": 0}, "has a bad 'resolution': 0"),
    ({"arch": "resnet18", "width": "32"}, "has a bad 'width': '32'"),
    ({"arch": "resnet18", "crop_ratio": 1.5}, "has a bad 'crop_ratio': 1.5"),
])
def test_a_malformed_backbone_json_is_named_in_one_line(betons, straight, tmp_path, meta, says):
    import json

    shutil.copy(straight("simclr.py") / "backbone.pt", tmp_path / "backbone.pt")
    (tmp_path / "backbone.json").write_text(json.dumps(meta))
    args = {**common(straight, betons), "backbone": str(tmp_path / "backbone.pt")}
    with pytest.raises(ValueError, match=re.escape(says)) as err:
        probe.main(probe.Args(**args))
    assert "\n" not in str(err.value) and "backbone.json" in str(err.value)


def test_results_go_where_they_can_be_written(betons, straight, tmp_path):
    """--out under a file, or a backbone in a folder that is not writable: one line before
    anything slow (the features cache goes beside the results, never beside the backbone)."""
    (tmp_path / "afile").write_text("x")
    args = common(straight, betons, out=str(tmp_path / "afile" / "probe.json"))
    with pytest.raises(ValueError, match="afile is a file, not a folder; pass --out"):
        probe.validate(probe.Args(**args))
    res = probe.main(probe.Args(**common(straight, betons, heads=("knn",), crop_ratio=0.5,
                                         out=str(tmp_path / "r" / "p.json"))))
    assert res["features_cache"].startswith(str(tmp_path / "r" / "probe_cache"))
    assert res["crop_ratio"] == 0.5


def test_unlabelled_training_images_are_left_out(betons, straight, unlabelled_beton):
    args = common(straight, betons, heads=("knn",))
    args["train_beton"] = unlabelled_beton
    with pytest.raises(ValueError, match="no labelled images"):
        probe.main(probe.Args(**args))
    with pytest.raises(ValueError, match="labels up to 9; pass --num-classes 10"):
        probe.main(probe.Args(**common(straight, betons, num_classes=4)))


def test_hyper_parameters_are_chosen_on_the_holdout_and_the_test_split_scored_once(
        betons, straight, monkeypatch):
    """Every candidate is scored on a seeded tenth of the training images; the validation (test)
    split is used once, by the chosen value. The holdout scores are recomputed here directly."""
    calls = []
    real_knn = probe.knn

    def recording_knn(train_x, train_y, query_x, query_y, k, temperature, num_classes):
        res = real_knn(train_x, train_y, query_x, query_y, k, temperature, num_classes)
        calls.append((len(train_x), len(query_x), k, res["top1"]))
        return res

    monkeypatch.setattr(probe, "knn", recording_knn)
    res = probe.main(probe.Args(**common(straight, betons, heads=("knn",), knn_k=(1, 5, 40),
                                         holdout=0.25)))
    # 320 training images: 80 held out, 240 to fit; then all 320 for the 100 validation images.
    chosen_k = res["knn"]["chosen"]["k"]
    assert [c[:3] for c in calls] == [(240, 80, 1), (240, 80, 5), (240, 80, 40),
                                      (320, 100, chosen_k)]
    holdout_scores = [c[3] for c in calls[:3]]
    assert res["knn"]["chosen"]["k"] == (1, 5, 40)[int(np.argmax(holdout_scores))]
    assert [g["top1"] for g in res["knn"]["chosen"]["holdout_grid"]] == holdout_scores
    assert res["knn"]["top1"] == calls[3][3]
    # The same split, drawn independently: the same holdout score for the chosen k.
    feats = torch.load(res["features_cache"], weights_only=True)  # this backbone's features
    x, y = feats["train"]
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    hold, fit = order[:80], order[80:]
    again = real_knn(x[fit], y[fit], x[hold], y[hold], res["knn"]["chosen"]["k"], 0.07, 10)
    assert again["top1"] == res["knn"]["chosen"]["holdout_top1"]
    with pytest.raises(ValueError, match="--holdout 0 with several values"):
        probe.main(probe.Args(**common(straight, betons, heads=("knn",), holdout=0.0)))


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_a_head_s_learning_rate_is_chosen_on_the_holdout(betons, straight, monkeypatch, head):
    """Each learning rate trains on the fit split and is scored on the 80 held-out training
    images; the best one is then trained on all 320 and scored once on the 100 test images."""
    calls = []
    real = probe.train_head

    def recording(kind, args, width, batches, val_x, val_y, steps, lr, weight_decay):
        res = real(kind, args, width, batches, val_x, val_y, steps, lr, weight_decay)
        calls.append((kind, sum(len(y) for _, y in batches()), len(val_y), lr, res["top1"]))
        return res

    monkeypatch.setattr(probe, "train_head", recording)
    lrs = (1e-4, 3e-2)  # one far too small for 3 epochs: the holdout tells them apart
    res = probe.main(probe.Args(**common(straight, betons, heads=(head,), lr=lrs, epochs=3,
                                         batch_size=64, holdout=0.25)))
    assert [c[:4] for c in calls[:2]] == [(head, 240, 80, lrs[0]), (head, 240, 80, lrs[1])]
    best = lrs[int(np.argmax([c[4] for c in calls[:2]]))]
    assert res[head]["chosen"]["lr"] == best == calls[2][3] and calls[2][1:3] == (320, 100)
    assert res[head]["top1"] == calls[2][4] and len(calls) == 3
