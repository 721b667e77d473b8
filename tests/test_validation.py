"""Bad settings: one line naming the flag and what it takes, a non-zero exit, before anything
slow (no loader compiled: a few seconds). Each method file's validate() is called on every rule
in-process; one command line per script checks what a user sees."""

import importlib
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from conftest import ROOT, run_in_process
from ffcv_ssl_common import with_settings

METHOD_FILES = ["simclr", "barlowtwins", "vicreg", "instance_simclr"]

# (field, bad value, the flag the message must name) for the settings every method file shares.
COMMON = [("num_classes", 0, "--num-classes"), ("train_subset", -1, "--train-subset"),
          ("num_workers", -1, "--num-workers"), ("arch", "resnet7", "--arch"),
          ("projector_dims", (0,), "--projector-dims"), ("projector_dims", (64, 0), "--projector-dims"),
          ("epochs", 0, "--epochs"), ("epochs", -1, "--epochs"), ("batch_size", 0, "--batch-size"),
          ("batch_size", 1, "--batch-size"), ("base_lr", 0.0, "--base-lr"),
          ("base_lr", float("nan"), "--base-lr"), ("base_lr", float("inf"), "--base-lr"),
          ("weight_decay", -1e-6, "--weight-decay"), ("momentum", 1.0, "--momentum"),
          ("lars_eta", 0.0, "--lars-eta"), ("warmup_epochs", 200.0, "--warmup-epochs"),
          ("warmup_epochs", -1.0, "--warmup-epochs"), ("probe_lr", 0.0, "--probe-lr"),
          ("out_dir", " ", "--out-dir"), ("checkpoint_every_min", -1.0, "--checkpoint-every-min"),
          ("seed", -1, "--seed"), ("max_steps", -5, "--max-steps"),
          ("resolution_schedule", (32, 16, 2), "--resolution-schedule"),
          ("resolution_schedule", (4, 16, 2), "--resolution-schedule"),
          ("resolution_schedule", (16, 32, 0), "--resolution-schedule")]
OWN = {
    "simclr": [("temperature", 0.0, "--temperature"), ("temperature", -1.0, "--temperature")],
    "barlowtwins": [("lambd", -0.1, "--lambd"), ("base_lr_biases", -1.0, "--base-lr-biases")],
    "vicreg": [("sim_coeff", -1.0, "--sim-coeff"), ("std_coeff", float("nan"), "--std-coeff"),
               ("cov_coeff", -1.0, "--cov-coeff")],
    "instance_simclr": [("temperature", 0.0, "--temperature"), ("num_negatives", 0,
                                                                "--num-negatives"),
                        ("resolution", 0, "--resolution"), ("patch_scale", (0.3, 0.1),
                                                            "--patch-scale"),
                        ("patch_ratio", (0.0, 1.0), "--patch-ratio"),
                        ("noise_std", -0.1, "--noise-std")],
}
VIEW = [("resolution", 0, "resolution"), ("crop_scale", (0.0, 1.0), "crop-scale"),
        ("crop_scale", (0.5, 1.5), "crop-scale"), ("crop_ratio", (2.0, 1.0), "crop-ratio"),
        ("flip_p", 1.5, "flip-p"), ("jitter_p", -0.1, "jitter-p"), ("brightness", -1.0,
                                                                     "brightness"),
        ("hue", 0.6, "hue"), ("blur_sigma", (0.0, 1.0), "blur-sigma"),
        ("blur_kernel_size", 4, "blur-kernel-size"), ("solarize_threshold", 300,
                                                      "solarize-threshold"),
        ("noise_std", float("nan"), "noise-std"), ("grayscale_p", 2.0, "grayscale-p")]


def cases():
    for name in METHOD_FILES:
        for field, value, flag in COMMON + OWN[name]:
            yield name, field, value, flag


@pytest.mark.parametrize("name,field,value,flag", list(cases()))
def test_each_rule_names_its_flag(name, field, value, flag, betons):
    m = importlib.import_module(name)
    good = with_settings(m.Args(), train_beton=(betons["train"],), val_beton=betons["val"])
    m.validate(good)  # the defaults pass
    with pytest.raises(ValueError, match="^" + flag.replace("-", r"\-") + " .*: must be "):
        m.validate(with_settings(good, **{field: value}))


@pytest.mark.parametrize("field,value,flag", VIEW)
def test_view_settings(field, value, flag, betons):
    import simclr

    good = with_settings(simclr.Args(), train_beton=(betons["train"],), val_beton=betons["val"])
    bad = replace(good, view2=replace(good.view2, **{field: value}))
    with pytest.raises(ValueError, match=f"^--view2.{flag} "):
        simclr.validate(bad)


@pytest.mark.parametrize("script,args,says", [
    # The command line's answer (one line on stderr, exit status 1) for the cases the issue
    # measured; every other rule is checked through validate() above.
    ("simclr.py", ["--batch-size", "0"], "error: --batch-size 0: must be an integer >= 2"),
    ("barlowtwins.py", ["--view1.resolution", "0"], "error: --view1.resolution 0: must be"),
    ("instance_simclr.py", ["--projector-dims", "0"], "error: --projector-dims (0,): must be widths"),
    ("probe.py", ["--knn-k", "0"], "error: --knn-k (0,): must be integers >= 1"),
    ("write_beton.py", ["--jpeg-quality", "0"], "error: --jpeg-quality 0: must be in 1..100"),
])
def test_command_line_gives_one_line_and_fails_fast(script, args, says, betons, tmp_path):
    if script in ("probe.py", "write_beton.py"):
        paths = ["--out-dir", str(tmp_path)] if script == "write_beton.py" else [
            "--train-beton", betons["train"], "--val-beton", betons["val"]]
    else:
        paths = ["--train-beton", betons["train"], "--val-beton", betons["val"],
                 "--out-dir", str(tmp_path)]
    started = time.time()
    status, _, stderr = run_in_process(script, *paths, *args)
    lines = stderr.strip().splitlines()
    assert status != 0 and len(lines) == 1 and says in lines[0], stderr[-2000:]
    assert time.time() - started < 20  # before any loader is compiled


@pytest.mark.parametrize("field,value,flag", [
    ("epochs", 0, "--epochs"), ("lr", (0.0,), "--lr"), ("lr", (), "--lr"),
    ("weight_decay", (float("nan"),), "--weight-decay"), ("knn_k", (0,), "--knn-k"),
    ("holdout", 1.0, "--holdout"), ("batch_size", 1, "--batch-size"),
    ("knn_temperature", 0.0, "--knn-temperature"), ("heads", (), "--heads"),
    ("mlp_dims", (0,), "--mlp-dims"), ("resolution", -1, "--resolution"),
    ("num_workers", -1, "--num-workers"), ("train_subset", -3, "--train-subset"),
    ("out", ROOT, "--out")])
def test_probe_rules(field, value, flag, betons):
    import probe

    good = probe.Args(train_beton=betons["train"], val_beton=betons["val"])
    probe.validate(good)
    with pytest.raises(ValueError, match="^" + flag.replace("-", r"\-") + " "):
        probe.validate(replace(good, **{field: value}))


@pytest.mark.parametrize("field,value,flag", [
    ("jpeg_quality", 101, "--jpeg-quality"), ("compress_probability", 1.5,
                                              "--compress-probability"),
    ("max_resolution", 4, "--max-resolution"), ("smart_threshold", -1, "--smart-threshold"),
    ("num_workers", 0, "--num-workers"), ("subset", -1, "--subset"), ("seed", -1, "--seed"),
    ("name", "a/b", "--name")])
def test_write_beton_rules(field, value, flag):
    import write_beton

    with pytest.raises(SystemExit, match=f"^error: {flag} "):
        write_beton.validate(replace(write_beton.Args(), **{field: value}))


@pytest.mark.parametrize("name", ["simclr", "barlowtwins", "vicreg"])
def test_views_of_two_sizes_are_refused(name, betons):
    """simclr.py concatenated them into a traceback; Barlow Twins and VICReg evaluated and
    exported at view 1's size without a word."""
    m = importlib.import_module(name)
    good = with_settings(m.Args(), train_beton=(betons["train"],), val_beton=betons["val"])
    bad = replace(good, view1=replace(good.view1, resolution=64))
    with pytest.raises(ValueError, match="^--view2.resolution 32 differs from --view1.resolution "
                                         "64: the two views must have one size"):
        m.validate(bad)
    m.validate(replace(bad, view2=replace(good.view2, resolution=64)))


def test_an_empty_train_beton_list_is_named(betons):
    import simclr

    with pytest.raises(ValueError, match=r"^--train-beton \(\): must be one or more .beton"):
        simclr.validate(with_settings(simclr.Args(), train_beton=()))


def test_labels_out_of_range(betons, unlabelled_beton):
    from ffcv_ssl_common import check_labels

    check_labels(betons["train"], 10, unlabelled_ok=False)
    with pytest.raises(ValueError, match="labels up to 9; pass --num-classes 10"):
        check_labels(betons["train"], 5, unlabelled_ok=False)
    check_labels(unlabelled_beton, 10, unlabelled_ok=True)
    with pytest.raises(ValueError, match="has label -1"):
        check_labels(unlabelled_beton, 10, unlabelled_ok=False)


def test_out_dir_that_is_a_file(betons):
    import simclr

    args = with_settings(simclr.Args(), train_beton=(betons["train"],), val_beton=betons["val"],
                         out_dir=betons["train"])
    with pytest.raises(ValueError, match="^--out-dir .*: must be a folder"):
        simclr.validate(args)


@pytest.mark.parametrize("which", ["train", "val"])
def test_missing_beton_is_named_before_anything_slow(which, betons, tmp_path):
    """A method file and probe.py name a missing .beton in one line (open_beton's check, reached
    through check_labels before any loader or model is built)."""
    import probe
    import simclr

    missing = str(tmp_path / "missing.beton")
    paths = {"train": betons["train"], "val": betons["val"], which: missing}
    with pytest.raises(FileNotFoundError, match="missing.beton: no such .beton file"):
        simclr.main(with_settings(simclr.Args(), train_beton=(paths["train"],),
                                  val_beton=paths["val"], out_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()  # nothing written
    with pytest.raises(FileNotFoundError, match="missing.beton: no such .beton file"):
        probe.main(probe.Args(train_beton=paths["train"], val_beton=paths["val"],
                              random_init=True, backbone=str(tmp_path / "b.pt")))
