"""recipes/*.sh: every recipe's command for every method parses and passes the method file's
checks, pins the values it says it pins, and each recipe trains two steps end to end on the tiny
data (under the file names the recipe expects)."""

import importlib
import os
import subprocess
import sys

import pytest
import tyro

from conftest import ROOT

RECIPES = ["fashion-mnist-cpu", "cifar10", "imagenet"]
METHODS = ["simclr", "barlowtwins", "vicreg", "instance_simclr"]


def command(recipe, method, env=None, *extra):
    """What the recipe would run: bash prints it with PYTHON=echo."""
    done = subprocess.run(["bash", os.path.join(ROOT, "recipes", f"{recipe}.sh"), method, *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": "echo", **(env or {})})
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("method", METHODS)
def test_every_recipe_is_valid_for_every_method(recipe, method):
    words = command(recipe, method)
    assert words[0] == f"{method}.py"
    m = importlib.import_module(method)
    args = tyro.cli(m.Args, args=words[1:])
    m.validate(args)  # every value in range (the .beton files need not exist for this)
    assert args.run.out_dir == f"runs/{recipe}/{method}"


def test_the_recipes_pin_what_they_say():
    simclr = importlib.import_module("simclr")
    imagenet = tyro.cli(simclr.Args, args=command("imagenet", "simclr")[1:])
    for view in (imagenet.view1, imagenet.view2):  # SimCLR's ImageNet views: strength 1.0
        assert (view.brightness, view.contrast, view.saturation, view.hue) == (0.8, 0.8, 0.8, 0.2)
        assert view.blur_p == 0.5 and view.resolution == 224
    assert (imagenet.model.arch, imagenet.data.num_classes, imagenet.data.eval_crop_ratio) == (
        "resnet50", 1000, 0.875)
    subset = tyro.cli(simclr.Args, args=command("imagenet", "simclr", {"SUBSET": "imagenet100"})[1:])
    assert (subset.model.arch, subset.data.num_classes) == ("resnet18", 100)
    assert subset.data.train_beton == ("data/imagenet100_train.beton",)
    cpu = tyro.cli(simclr.Args, args=command("fashion-mnist-cpu", "simclr", {}, "--batch-size",
                                             "32")[1:])
    assert (cpu.optim.batch_size, cpu.model.width, cpu.optim.optimizer) == (32, 32, "adamw")
    done = subprocess.run(["bash", "recipes/cifar10.sh", "byol"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHON": "echo"})
    assert done.returncode == 2 and "unknown method 'byol'" in done.stderr


@pytest.mark.parametrize("recipe,method", [("fashion-mnist-cpu", "vicreg"),
                                           ("cifar10", "simclr"), ("imagenet", "barlowtwins")])
def test_a_recipe_trains_two_steps(recipe, method, betons, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    name = {"fashion-mnist-cpu": "fashion-mnist", "cifar10": "cifar10",
            "imagenet": "imagenet"}[recipe]
    os.symlink(betons["train"], data / f"{name}_train.beton")
    os.symlink(betons["val"], data / f"{name}_val.beton")
    small = ["--max-steps", "2", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "16",
             "--num-workers", "1",
             "--device", "cpu", "--width", "16", "--projector-dims", "32", "16",
             "--out-dir", str(tmp_path / "run")]
    done = subprocess.run(["bash", f"recipes/{recipe}.sh", method, *small], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "DATA_DIR": str(data), "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "backbone.pt").exists() and "Traceback" not in done.stderr


def test_make_clean_keeps_runs_and_data():
    """`make clean` once deleted runs/ (every checkpoint and backbone) while the README offered it
    for emptying numba's cache; what it would run (make -n) never touches runs/ or data/."""
    for target in ("clean", "clean-cache"):
        done = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "rm" in done.stdout and "runs" not in done.stdout and "data" not in done.stdout
