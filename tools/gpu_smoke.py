"""The four method files end to end on a CUDA GPU, with the real ffcv loaders (tools/gpu_check.py
checks the models without ffcv): a few epochs of each on a subset of the Fashion-MNIST files.

    python tools/gpu_smoke.py              # ~2 min on a GPU machine (16 cores); exit 1 on a failure
    GPU_SMOKE_DRY_RUN=1 python tools/gpu_smoke.py   # the same runs on the CPU, tiny

Runs, side by side, each in its own process:
- simclr.py under torchrun (1 process, so any GPU machine can run it): NCCL, DDP, SyncBatchNorm,
  ffcv's distributed loader, the loaders' CUDA output (uint8 copied without blocking, normalised
  on the device), bf16 autocast; 2 epochs;
- simclr.py in fp16 with its gradient scaler, stopped after 8 steps (mid-epoch) and resumed (the
  dry run: fp32, 2 steps);
- barlowtwins.py (at --width 32: ScaledResNet), vicreg.py, instance_simclr.py: 1 epoch each;
then probe.py (heads and k-NN on the device) on the torchrun run's backbone. Checked: every exit
status, the resolved device / precision / SyncBatchNorm in args.json, finite losses in log.jsonl,
equal DDP replicas, the resumed run taking up at step 8 with its loss scale, and a k-NN accuracy
well above chance.
"""

import json
import math
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.environ.get("GPU_SMOKE_TRAIN", os.path.join(ROOT, "data/fashion-mnist_train.beton"))
VAL = os.environ.get("GPU_SMOKE_VAL", os.path.join(ROOT, "data/fashion-mnist_val.beton"))
FAILED = []


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def records(out_dir):
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    return [r for r in map(json.loads, open(path)) if "epoch" in r]


def main():
    dry = os.environ.get("GPU_SMOKE_DRY_RUN") == "1"
    for path in (TRAIN, VAL):
        if not os.path.isfile(path):
            sys.exit(f"error: {path} not found: run `make data` (or set GPU_SMOKE_TRAIN / "
                     f"GPU_SMOKE_VAL to a train and a val .beton)")
    work = tempfile.mkdtemp(prefix="gpu_smoke_")
    size = ["--batch-size", "32", "--train-subset", "128", "--projector-dims", "64", "32",
            "--device", "cpu"] if dry else ["--batch-size", "256", "--train-subset", "3072"]
    common = ["--train-beton", TRAIN, "--val-beton", VAL, "--num-workers", "1" if dry else "3",
              "--warmup-epochs", "0", *size]
    py = sys.executable

    def method(script, out, *extra):
        return [py, os.path.join(ROOT, script), *common, "--out-dir", os.path.join(work, out),
                *extra]

    # fp16 is emulated on CPUs (minutes per step): the dry run stops and resumes in fp32.
    stop_at, precision = (2, "fp32") if dry else (8, "fp16")
    resume = method("simclr.py", "resume", "--precision", precision, "--epochs", "2")
    runs = {
        "torchrun simclr": [py, "-m", "torch.distributed.run", "--standalone",
                            "--nproc_per_node=1", *method("simclr.py", "ddp", "--epochs", "2")[1:]],
        f"{precision} simclr, stopped at step {stop_at} and resumed": ["bash", "-c", " ".join(
            [f"'{a}'" for a in resume + ["--max-steps", str(stop_at)]]) + " && "
            + " ".join(f"'{a}'" for a in resume)],
        "barlowtwins, --width 32": method("barlowtwins.py", "bt", "--epochs", "1", "--width", "32"),
        "vicreg": method("vicreg.py", "vicreg", "--epochs", "1"),
        "instance_simclr": method("instance_simclr.py", "inst", "--epochs", "1"),
    }
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    # One empty numba cache that the five runs fill at the same time, as trainings started
    # together in one checkout do (README, "Several runs at once").
    env["NUMBA_CACHE_DIR"] = os.path.join(work, "numba_cache")
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(
        os.path.join(work, f"{k}.log"), "w"), stderr=subprocess.STDOUT)
        for k, (name, cmd) in enumerate(runs.items())}
    for k, (name, proc) in enumerate(procs.items()):
        code = proc.wait()
        check(f"{name}: exit 0", code == 0, "" if code == 0 else
              f"(exit {code}; log {os.path.join(work, f'{k}.log')})")

    expect = "cpu" if dry else "cuda"
    for out, epochs in (("ddp", 2), ("resume", 2), ("bt", 1), ("vicreg", 1), ("inst", 1)):
        d = os.path.join(work, out)
        resolved = json.load(open(os.path.join(d, "args.json")))["resolved"] if os.path.exists(
            os.path.join(d, "args.json")) else {}
        check(f"{out}: device {expect}", resolved.get("device", "").startswith(expect), resolved)
        recs = records(d)
        check(f"{out}: {epochs} epochs logged, losses finite", len(recs) == epochs and all(
            math.isfinite(r["loss"]) for r in recs), [round(r["loss"], 4) for r in recs])
    bt = os.path.join(work, "bt", "backbone.json")
    check("barlowtwins: --width 32 exported", os.path.exists(bt) and json.load(open(bt)).get(
        "width") == 32)
    ddp = json.load(open(os.path.join(work, "ddp", "args.json")))["resolved"]
    check("torchrun: one process, SyncBatchNorm on GPUs", ddp["world"] == 1
          and ddp["sync_bn"] == (not dry), ddp)
    check("torchrun: replicas equal", all(r["replicas_equal"] for r in records(
        os.path.join(work, "ddp"))))
    log = open(os.path.join(work, "1.log")).read()
    check(f"{precision}: resumed at step {stop_at}",
          f"at epoch 0, batch {stop_at} (step {stop_at})" in log)
    scales = [r.get("loss_scale") for r in records(os.path.join(work, "resume"))]
    check("fp16: loss scale logged", dry or len(scales) == 2 and all(s and s > 0 for s in scales),
          "(not in the dry run)" if dry else scales)

    probe_out = os.path.join(work, "probe.json")
    probe = subprocess.run([py, os.path.join(ROOT, "probe.py"), "--backbone",
                            os.path.join(work, "ddp", "backbone.pt"), "--train-beton", TRAIN,
                            "--val-beton", VAL, "--train-subset", "512" if dry else "3072",
                            "--epochs", "5" if dry else "30", "--num-workers", "2",
                            "--out", probe_out, *(["--device", "cpu"] if dry else [])],
                           cwd=ROOT, env=env, capture_output=True, text=True)
    check("probe.py: exit 0", probe.returncode == 0, probe.stdout[-300:] + probe.stderr[-300:])
    if probe.returncode == 0:
        result = json.load(open(probe_out))
        accuracies = {head: round(result[head]["top1"], 4) for head in ("linear", "mlp", "knn")}
        check("probe.py: k-NN well above chance (10%)", accuracies["knn"] > 0.3, accuracies)
    print(f"logs in {work}")
    if FAILED:
        sys.exit(f"{len(FAILED)} check(s) failed: {', '.join(FAILED)}")
    print("all checks passed")


if __name__ == "__main__":
    main()
