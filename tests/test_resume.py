"""Interrupted runs, as on a pre-emptible cluster: kill -9 at random moments mid-epoch and the
same command again ends with the uninterrupted run's weights bit for bit; SIGUSR1 (SLURM's
--signal) saves and stops (SIGTERM: the same handler, tests/test_run_helpers.py);
a resume with other settings, a corrupt checkpoint or a pickle that would run code is refused in
one line before anything slow. The resume machinery is ffcv_ssl_common.py's, called the same
way by every method file (tests/test_style.py checks that), so simclr.py stands for all four here;
test_e2e.py resumes instance SimCLR's loop, test_run_helpers.py the helpers in-process."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import (METHODS, ROOT, TINY, args_from_settings, method_args, run_in_process,
                      run_method, same_weights)


def start(betons, out_dir, *extra):
    cmd = [sys.executable, "simclr.py", "--train-beton", betons["train"], "--val-beton",
           betons["val"], "--out-dir", str(out_dir), *TINY, *METHODS["simclr.py"], *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def checkpoint_step(out_dir):
    try:  # the checkpoint is renamed into place: never half-written
        return torch.load(out_dir / "checkpoint.pt", weights_only=True)["step"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return -1


def wait_for_step(proc, out_dir, step, timeout=300):
    deadline = time.time() + timeout
    while checkpoint_step(out_dir) < step:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline
        time.sleep(0.05)


def test_kill_9_and_sigterm_at_random_moments_then_same_command(betons, straight, tmp_path):
    """Checkpoints every step (--checkpoint-every-min 1e-6). SIGKILL once the run has passed a
    random step of epoch 1, at a random moment of the next step (or while it saves); the same
    command resumes; SIGUSR1 at a random step of epoch 2 saves and stops with status 138; the
    same command finishes. The result is the uninterrupted run's, bit for bit, and so is the
    log's sequence of epochs."""
    rng = random.Random(int(os.environ.get("PYTEST_SEED", time.time())))
    every_step = ("--checkpoint-every-min", "1e-6")
    proc = start(betons, tmp_path, *every_step)
    wait_for_step(proc, tmp_path, rng.randint(1, 3))
    time.sleep(rng.uniform(0, 0.5))
    proc.kill()
    proc.communicate()
    assert 1 <= checkpoint_step(tmp_path) < 5, "killed too late to test anything"

    proc = start(betons, tmp_path, *every_step)
    wait_for_step(proc, tmp_path, rng.randint(6, 8))
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR1, err[-2000:]
    assert "resumed from" in out and "caught signal 10" in out and "Traceback" not in err
    assert checkpoint_step(tmp_path) < 10
    assert not (tmp_path / "backbone.pt").exists()  # not exported: the run is not finished

    done = run_method("simclr.py", betons, tmp_path, *every_step)
    assert "resumed from" in done.stdout
    assert same_weights(straight("simclr.py") / "backbone.pt", tmp_path / "backbone.pt")
    epochs = [json.loads(line) for line in open(tmp_path / "log.jsonl") if "probe_acc" in line]
    assert [e["epoch"] for e in epochs] == [1, 2]  # no duplicated or lost epoch lines


def test_other_settings_are_refused_and_no_resume_starts_a_fresh_log(betons, straight,
                                                                      tmp_path):
    import shutil

    shutil.copy(straight("simclr.py") / "checkpoint.pt", tmp_path / "checkpoint.pt")
    shutil.copy(straight("simclr.py") / "log.jsonl", tmp_path / "log.jsonl")
    import simclr
    from dataclasses import replace

    from ffcv_ssl_common import load_checkpoint, with_settings

    args = simclr_args(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["args"])
    load_checkpoint(str(tmp_path / "checkpoint.pt"), args, "simclr")  # the same settings: fine
    for changed, says in ((dict(temperature=0.5), "--temperature 0.5 (checkpoint: 0.15)"),
                          (dict(epochs=3), "--epochs 3 (checkpoint: 2)"),
                          (dict(view1=replace(args.view1, hue=0.2)),
                           "--view1.hue 0.2 (checkpoint: 0.1)"),
                          (dict(projector_dims=(64, 64)), "--projector-dims [64, 64] (checkpoint: "
                                                          "[64, 32])")):
        with pytest.raises(ValueError, match="is from a run with other settings") as err:
            load_checkpoint(str(tmp_path / "checkpoint.pt"), with_settings(args, **changed),
                            "simclr")
        assert says in str(err.value) and "--no-resume" in str(err.value)
    for run_only in (dict(num_workers=4), dict(max_steps=3), dict(device="cuda")):
        load_checkpoint(str(tmp_path / "checkpoint.pt"), with_settings(args, **run_only),
                        "simclr")
    # The command line: one line, exit 1, the old run untouched.
    status, _, stderr = run_in_process("simclr.py", *method_args("simclr.py", betons, tmp_path,
                                                                 "--temperature", "0.5"))
    assert status == 1 and "--temperature 0.5 (checkpoint: 0.15)" in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    # Settings that do not change the result may differ (here: loader threads).
    same = run_method("simclr.py", betons, tmp_path, "--num-workers", "2")
    assert "resumed from" in same.stdout and "epoch 2, batch 0" in same.stdout
    # --no-resume: a new run, a new log (not appended to the old one).
    run_method("simclr.py", betons, tmp_path, "--no-resume", "--epochs", "1")
    epochs = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [e["epoch"] for e in epochs] == [1]


class RunsCode:
    """A pickle that would create a file when loaded without weights_only."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def simclr_args(saved: dict):
    """simclr.Args from a checkpoint's saved arguments."""
    import simclr

    return args_from_settings(simclr, saved)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "code", "not_a_checkpoint",
                                    "other_method"])
def test_damaged_checkpoints_are_refused_in_one_line(straight, tmp_path, damage):
    from ffcv_ssl_common import load_checkpoint

    path = tmp_path / "checkpoint.pt"
    good = (straight("simclr.py") / "checkpoint.pt").read_bytes()
    marker = tmp_path / "pwned"
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(4096))
    elif damage == "code":
        torch.save({"model": RunsCode(str(marker))}, path)
    elif damage == "other_method":  # vicreg.py's checkpoint in simclr.py's folder
        ckpt = torch.load(straight("simclr.py") / "checkpoint.pt", weights_only=True)
        torch.save({**ckpt, "method": "vicreg"}, path)
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    args = simclr_args(torch.load(straight("simclr.py") / "checkpoint.pt",
                                  weights_only=True)["args"])
    with pytest.raises(ValueError) as err:
        load_checkpoint(str(path), args, "simclr")
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "--no-resume" in message
    assert not marker.exists()  # the pickle's code never ran


def test_damaged_checkpoint_on_the_command_line(betons, straight, tmp_path):
    good = (straight("simclr.py") / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(good[: len(good) // 3])
    started = time.time()
    run = run_method("simclr.py", betons, tmp_path, check=False)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "cannot be loaded as a checkpoint" in lines[0]
    assert time.time() - started < 60  # refused before building loaders


def test_checkpoint_loads_on_the_cpu_whatever_the_device(straight, monkeypatch):
    """A GPU run resumed with map_location=<the GPU> gave torch.set_rng_state a CUDA tensor (a
    TypeError). load_checkpoint always maps to the CPU; load_state_dict moves the weights."""
    from ffcv_ssl_common import load_checkpoint

    seen = []
    real_load = torch.load

    def recording_load(*a, **k):
        seen.append(k.get("map_location"))
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", recording_load)
    path = straight("simclr.py") / "checkpoint.pt"
    args = simclr_args(real_load(path, weights_only=True)["args"])
    seen.clear()
    ckpt = load_checkpoint(str(path), args, "simclr")
    assert seen == ["cpu"]
    assert ckpt["rng"].device.type == "cpu" and ckpt["rng"].dtype == torch.uint8
    torch.set_rng_state(ckpt["rng"])  # what resuming does
    assert all(t.device.type == "cpu" for t in ckpt["model"].values())


def test_train_subset_smaller_than_a_batch(betons, tmp_path):
    status, _, stderr = run_in_process("simclr.py", *method_args("simclr.py", betons, tmp_path,
                                                                 "--train-subset", "10"))
    assert status == 1 and "--train-subset 10 is smaller than one batch" in stderr
    assert "Traceback" not in stderr
