"""Every method file end to end on the tiny .beton the tests write: two epochs in one go (logs,
checkpoint, provenance, an export that torchvision loads strictly), a run stopped mid-epoch and
resumed that ends with bit-identical weights, training on two files one of which is unlabelled,
and torchrun with 2 CPU processes whose weights agree. Each launch costs ~15 s of imports and
pipeline compilation: the files whose code paths are the same (test_style.py) share tests."""

import json
import math
import os

import pytest
import torch

from conftest import METHODS, load_exported_resnet18, run_method, same_weights

SCRIPTS = list(METHODS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_run_writes_logs_checkpoint_provenance_and_backbone(script, straight):
    out = straight(script)
    names = set(os.listdir(out))
    assert {"args.json", "log.jsonl", "checkpoint.pt", "backbone.pt", "backbone.json",
            "curves.png", "code"} <= names
    assert not [n for n in names if ".tmp" in n]
    epochs = [json.loads(line) for line in open(out / "log.jsonl") if "probe_acc" in line]
    assert [e["epoch"] for e in epochs] == [1, 2] and [e["step"] for e in epochs] == [5, 10]
    for e in epochs:
        assert math.isfinite(e["loss"]) and e["images_per_s"] > 0 and e["replicas_equal"] == 1
        # 100 validation images: an accuracy is a whole number of percent
        assert round(100 * e["probe_acc"], 3) == round(100 * e["probe_acc"])
        assert round(100 * e["knn_acc"], 3) == round(100 * e["knn_acc"])
        assert 1 <= e["rankme"] <= 100  # 100 images x 512 features: rank at most 100
    # The tiny data's labels are its brightness levels: k-NN on any features finds them.
    assert max(e["knn_acc"] for e in epochs) > 0.3
    if script == "vicreg.py":
        assert {"repr", "std", "cov"} <= set(epochs[-1])  # each term logged
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (2, 0, 10)
    assert ckpt["args"]["batch_size"] == 64
    # Provenance: the resolved arguments, the command and a copy of the code that ran.
    info = json.load(open(out / "args.json"))
    assert info["batch_size"] == 64 and info["resolved"]["world"] == 1 and script in " ".join(
        info["command"])
    assert "git_commit" in info
    code = out / "code" / script
    assert code.read_text() == open(os.path.join(os.path.dirname(__file__), "..", script)).read()


@pytest.mark.parametrize("script", SCRIPTS)
def test_export_and_its_stem_description(script, straight):
    out = straight(script)
    meta = json.load(open(out / "backbone.json"))
    assert meta == {"arch": "resnet18", "width": 64, "resolution": 16, "crop_ratio": 1.0,
                    "method": script[:-3],
                    "stem": {"conv1": {"kernel_size": 3, "stride": 1, "padding": 1},
                             "maxpool": False}}
    net = load_exported_resnet18(out / "backbone.pt")
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 512)
    # Trained: the weights moved away from the same seed's initialisation.
    import importlib

    from ffcv_ssl_common import with_settings

    module = importlib.import_module(script[:-3])
    torch.manual_seed(0)
    init = module.__dict__[{"simclr.py": "SimCLR", "barlowtwins.py": "BarlowTwins",
                            "vicreg.py": "VICReg", "instance_simclr.py": "InstanceSimCLR"}[script]](
        with_settings(module.Args(), projector_dims=(64, 32)), "small").backbone.state_dict()
    trained = torch.load(out / "backbone.pt", weights_only=True)
    assert not torch.equal(init["layer1.0.conv1.weight"], trained["layer1.0.conv1.weight"])


# simclr.py is resumed after kill -9 and SIGTERM in test_resume.py; Barlow Twins' and VICReg's
# main() is simclr.py's (test_style.py); instance SimCLR's loop differs (its negatives).
@pytest.mark.parametrize("script", ["instance_simclr.py"])
def test_stopped_mid_epoch_and_resumed_gives_bit_identical_weights(script, betons, straight,
                                                                    tmp_path):
    """--max-steps 3 stops in the middle of epoch 1 (5 steps) with a checkpoint; the same
    command without it resumes at batch 3 and ends with the uninterrupted run's weights, bit for
    bit, and the same log."""
    stopped = run_method(script, betons, tmp_path, "--max-steps", "3")
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (0, 3, 3)
    assert "epoch 1/2" not in stopped.stdout
    resumed = run_method(script, betons, tmp_path)
    assert "resumed from" in resumed.stdout and "at epoch 0, batch 3 (step 3)" in resumed.stdout
    assert same_weights(straight(script) / "backbone.pt", tmp_path / "backbone.pt")
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    ref = [json.loads(line) for line in open(straight(script) / "log.jsonl")]
    drop = ("images_per_s", "train_min")  # timings
    assert [{k: v for k, v in r.items() if k not in drop} for r in log] == [
        {k: v for k, v in r.items() if k not in drop} for r in ref]


def test_fp16_and_its_gradient_scaler_are_saved_and_resumed(betons, tmp_path):
    """--precision fp16 (autocast and a gradient scaler, for GPUs before Ampere) on the CPU: the
    scaler's state is saved in the checkpoint and restored on resume. Here the first step's
    gradients overflow at torch's initial scale 2^16 (the step is skipped, the scale halved);
    after the resume the second step counts as the first good one at 2^15. A fresh scaler after
    the resume would be at 2^16 (or at 2^15 with no good step). CPUs emulate fp16 convolutions'
    backward (~6 s per step here even for 2 images), hence 2 steps of 2 images and no
    uninterrupted reference run (bit-identical resume is tested in fp32 / bf16 elsewhere)."""
    fp16 = ["--precision", "fp16", "--epochs", "1", "--batch-size", "2", "--train-subset", "4"]
    run_method("simclr.py", betons, tmp_path, *fp16, "--max-steps", "1")
    stopped = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["scaler"]
    assert (stopped["scale"], stopped["_growth_tracker"]) == (32768.0, 0)
    resumed = run_method("simclr.py", betons, tmp_path, *fp16)
    assert "at epoch 0, batch 1 (step 1)" in resumed.stdout
    done = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert done["step"] == 2
    assert (done["scaler"]["scale"], done["scaler"]["_growth_tracker"]) == (32768.0, 1)
    info = json.load(open(tmp_path / "args.json"))
    assert info["resolved"]["precision"] == "fp16"
    epoch = [json.loads(line) for line in open(tmp_path / "log.jsonl")][-1]
    assert epoch["loss_scale"] == 32768.0 and math.isfinite(epoch["loss"])


def test_unlabelled_images_and_two_training_files(betons, unlabelled_beton, tmp_path):
    """STL-10's use: train on a labelled and an unlabelled (label -1) file together; the online
    probe learns from the labelled images only."""
    two = {"train": [betons["train"], unlabelled_beton], "val": betons["val"]}
    run_method("simclr.py", two, tmp_path, "--epochs", "1")
    epoch = [json.loads(line) for line in open(tmp_path / "log.jsonl") if "probe_acc" in line][0]
    assert epoch["step"] == 5 + 3  # 320 / 64 + 192 / 64 batches
    assert math.isfinite(epoch["loss"]) and epoch["probe_acc"] > 0


@pytest.mark.parametrize("script", ["simclr.py", "instance_simclr.py"])
def test_torchrun_two_cpu_processes_keep_identical_weights(script, betons, tmp_path):
    """DDP over 2 gloo processes for one epoch; at its end every process's weights are compared
    (check_replicas) and must be bit-identical: without DDP's gradient averaging the two
    processes, which train on different halves of each batch, would drift apart."""
    extra = ["--in-batch-negatives", "--recipe", "simclr"] if script == "instance_simclr.py" else []
    run = run_method(script, betons, tmp_path, "--epochs", "1", *extra, torchrun=True)
    assert '"world": 2' in run.stdout
    assert "SyncBatchNorm needs GPUs" in run.stdout and '"sync_bn": false' in run.stdout
    epoch = [json.loads(line) for line in open(tmp_path / "log.jsonl") if "probe_acc" in line][0]
    assert epoch["replicas_equal"] == 2 and epoch["step"] == 5  # 320 images / (2 x 32) per step


def test_torchrun_resumes_mid_epoch_exactly_and_only_at_its_world_size(betons, tmp_path):
    """2 processes stopped at step 3 of 5 and resumed end with the weights of 2 processes run
    in one go, bit for bit; the checkpoint resumed by 1 process is refused in one line (each
    process takes its share of every batch: the data order would not be the same)."""
    import shutil

    from conftest import method_args, run_in_process

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_method("simclr.py", betons, straight, "--epochs", "1", torchrun=True)
    run_method("simclr.py", betons, stopped, "--epochs", "1", "--max-steps", "3", torchrun=True)
    shutil.copytree(stopped, tmp_path / "alone")
    resumed = run_method("simclr.py", betons, stopped, "--epochs", "1", torchrun=True)
    assert "at epoch 0, batch 3 (step 3)" in resumed.stdout
    assert same_weights(straight / "backbone.pt", stopped / "backbone.pt")
    status, _, stderr = run_in_process("simclr.py", *method_args(
        "simclr.py", betons, tmp_path / "alone", "--epochs", "1"))
    assert status == 1 and "saved by a run of 2 process(es), this one has 1" in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_time_budget_ends_the_schedule_on_time(betons, tmp_path, monkeypatch):
    """--time-budget-min: the learning rate follows the fraction of the budget used (warm-up, then
    cosine to ~0 when the budget is spent), training stops there mid-epoch with an evaluation and
    an export, and the same command again finds the budget spent and trains nothing more. With
    --wandb (offline: no account, no network) the epochs' monitors go to a local wandb run."""
    budget_min = 0.15  # 9 s of training; the tiny data's epoch takes a few seconds
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_method("simclr.py", betons, tmp_path, "--epochs", "100", "--warmup-epochs", "10",
               "--time-budget-min", str(budget_min), "--wandb")
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    epochs = [r for r in rows if "probe_acc" in r]
    last = epochs[-1]
    assert 1 <= len(epochs) < 100 and last["epoch"] < 100
    assert budget_min <= last["train_min"] < budget_min + 0.1  # stopped after the step that
    assert last["lr"] < 0.15 * 1.0 * 64 / 256  # spent it; the cosine ended near 0 (peak 0.25)
    assert {"knn_acc", "rankme"} <= set(last) and (tmp_path / "backbone.pt").exists()
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["elapsed"] >= 60 * budget_min and ckpt["step"] == last["step"]
    again = run_method("simclr.py", betons, tmp_path, "--epochs", "100", "--warmup-epochs", "10",
                       "--time-budget-min", str(budget_min))
    assert "resumed from" in again.stdout and "loss" not in again.stdout.split("resumed from")[1]
    assert [json.loads(line) for line in open(tmp_path / "log.jsonl")] == rows
    records = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(records) == 1  # one run, not one per launch: the id is stable per out_dir
    assert b"rankme" in records[0].read_bytes() and b"knn_acc" in records[0].read_bytes()


def test_main_job_prints_the_table_it_computed(betons, tmp_path):
    """benchmarks/bench_fashion_mnist.py (the README's main job) with a tiny budget: it trains,
    probes the backbone and two random inits (side by side, one file per seed), and its table's
    numbers are those files' numbers: mean and sd over the seeds, gain = trained - mean."""
    import statistics
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "demo"
    cmd = [sys.executable, "benchmarks/bench_fashion_mnist.py", "--quick", "--budget-min", "0.05",
           "--seeds", "0", "1", "--data", betons["train"], betons["val"], "--out-dir", str(out),
           "--probe-train-subset", "320", "--batch-size", "64", "--projector-dims", "64", "32",
           "--num-workers", "1", "--device", "cpu"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    ssl = json.load(open(out / "probe_backbone.json"))
    rnd = [json.load(open(out / f"probe_random_init_seed{s}.json")) for s in (0, 1)]
    assert rnd[0]["linear"] != rnd[1]["linear"] or rnd[0]["knn"] != rnd[1]["knn"]
    table = (out / "table.md").read_text()
    assert table in done.stdout
    for head in ("linear", "mlp", "knn"):
        a, b = 100 * ssl[head]["top1"], [100 * r[head]["top1"] for r in rnd]
        mean = statistics.mean(b)
        row = (f"| {head} | {a:.2f}% | {mean:.2f}% ± {statistics.stdev(b):.2f} | "
               f"{b[0]:.2f} / {b[1]:.2f} | **{a - mean:+.2f}** |")
        assert row in table, (row, table)


def test_resolution_schedule_grows_the_views_and_resumes_exactly(betons, tmp_path):
    """--resolution-schedule 16 24 1 over 2 epochs: 16 then 24 px views (a new loader, compiled
    for the new size), evaluation and export at 24 px; a run stopped in epoch 1 resumes with
    that epoch's loader and ends with the uninterrupted run's weights, bit for bit."""
    from ffcv_ssl_common import epoch_resolution

    assert [epoch_resolution((16, 32, 2), 99, e) for e in range(4)] == [16, 24, 32, 32]
    assert [epoch_resolution((16, 160, 10), 99, e) for e in (0, 1, 5, 9, 10)] == [
        16, 24, 88, 144, 160]  # 16 + 144 e / 10, rounded down to multiples of 8
    assert epoch_resolution(None, 28, 3) == 28
    flags = ["--resolution-schedule", "16", "24", "1"]
    straight = tmp_path / "straight"
    run_method("simclr.py", betons, straight, *flags)
    rows = [json.loads(line) for line in open(straight / "log.jsonl")]
    assert [r["resolution"] for r in rows if "probe_acc" in r] == [16, 24]
    assert json.load(open(straight / "backbone.json"))["resolution"] == 24
    stopped = tmp_path / "stopped"
    run_method("simclr.py", betons, stopped, *flags, "--max-steps", "7")  # epoch 1, batch 2
    resumed = run_method("simclr.py", betons, stopped, *flags)
    assert "at epoch 1, batch 2 (step 7)" in resumed.stdout
    assert same_weights(straight / "backbone.pt", stopped / "backbone.pt")


def test_epochs_that_end_inside_the_budget_still_end_the_schedule(betons, tmp_path):
    """--time-budget-min 30 with 2 tiny epochs (seconds): the epochs bind, and the learning rate
    still decays to ~0 by the last step (it followed the budget alone: ~peak at the end)."""
    run_method("simclr.py", betons, tmp_path, "--warmup-epochs", "0", "--time-budget-min", "30")
    steps = [json.loads(line) for line in open(tmp_path / "log.jsonl") if "probe_acc" in line]
    peak = 1.0 * 64 / 256
    assert steps[-1]["step"] == 10 and steps[-1]["lr"] < 0.05 * peak  # step 10 of 10
