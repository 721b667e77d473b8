"""README.md's commands work as written: every `python <script>.py ...` in its bash blocks parses
with that script's own command line (a renamed or removed flag fails here), every recipe command
gives its method file a valid command line, every `make` target exists, every file the README
links to is in the repository, and its Python example runs (on the tests' data, on the CPU)."""

import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
import tyro

from conftest import ROOT

README = open(os.path.join(ROOT, "README.md")).read()
PARSERS = {"ffcv_ssl_common.py": "PreviewArgs"}  # script -> its tyro target (default: Args)


def commands() -> list[list[str]]:
    """The README's bash blocks, one command per entry: continuation lines joined, comments
    and `[ ... ] &&` shell tests dropped, `VAR=value` prefixes kept as words."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            words = shlex.split(line, comments=True)
            if words and not words[0].startswith(("#", "[")):
                out.append(words)
    return out


def module_of(path: str):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3],
                                                  os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # tyro reads the source of its classes
    spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]


def python_commands():
    for words in commands():
        if words[0] == "python" and words[1].endswith(".py"):
            yield words[1], words[2:]
        if words[:2] == ["srun", "python"]:
            yield words[2], [w for w in words[3:] if w != "..."]


def test_the_readme_has_commands_to_check():
    scripts = {s for s, _ in python_commands()}
    assert {"write_beton.py", "probe.py", "simclr.py"} <= scripts, scripts
    assert any(w[:2] == ["bash", "recipes/imagenet.sh"] or "recipes/imagenet.sh" in w
               for w in commands())


@pytest.mark.parametrize("script,flags", list(python_commands()),
                         ids=[" ".join([s, *f])[:60] for s, f in python_commands()])
def test_every_python_command_parses(script, flags):
    if script == "benchmarks/bench_fashion_mnist.py":  # its flags: --quick, --method, --budget-min
        source = open(os.path.join(ROOT, script)).read()
        for flag in (f for f in flags if f.startswith("--")):
            assert f'"{flag}"' in source, f"{script} has no {flag}"
        return
    module = module_of(script)
    target = getattr(module, PARSERS.get(os.path.basename(script), "Args"))
    tyro.cli(target, args=flags)  # exits (and fails the test) on an unknown flag or bad value


def recipe_commands():
    for words in commands():
        env = {}
        while words and re.match(r"^[A-Z_]+=", words[0]):
            key, value = words.pop(0).split("=", 1)
            env[key] = value
        if words[:1] == ["bash"] and words[1].startswith("recipes/"):
            yield env, words[1], words[2], words[3:]


@pytest.mark.parametrize("env,recipe,method,flags", list(recipe_commands()),
                         ids=[f"{r} {m} {' '.join(f)}"[:60] for _, r, m, f in recipe_commands()])
def test_every_recipe_command_gives_a_valid_command_line(env, recipe, method, flags):
    env = {k: v for k, v in env.items() if k != "LAUNCH"}  # torchrun: the same flags after it
    done = subprocess.run(["bash", recipe, method, *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env, "PYTHON": "echo"})
    assert done.returncode == 0, done.stderr
    words = done.stdout.split()
    module = importlib.import_module(method)
    module.validate(tyro.cli(module.Args, args=words[1:]))


def test_every_make_target_exists():
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    for words in commands():
        if words[0] == "make":
            assert re.search(rf"^{re.escape(words[1])}:", makefile, re.M), words


def test_every_linked_file_exists():
    links = re.findall(r"\]\(((?!https?:)[^)#\s]+)\)", README)
    assert links
    missing = [link for link in links if not os.path.exists(os.path.join(ROOT, link))]
    assert not missing, missing


def test_the_loader_example_runs(betons):
    """The README's Python block, on the tests' small data and the CPU: one batch of two views."""
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    code = (code.replace('"data/fashion-mnist_train.beton"', repr(betons["train"]))
                .replace('"data/fashion-mnist_val.beton"', repr(betons["val"]))
                .replace('device="cuda"', 'device="cpu"').replace("num_workers=8", "num_workers=1")
                .replace("batch_size=256", "batch_size=32")
                .replace("for view_1, view_2, label in train: ...",
                         "for view_1, view_2, label in train: break"))
    scope = {}
    exec(code, scope)
    assert scope["view_1"].shape == scope["view_2"].shape == (32, 3, 32, 32)
    assert not torch.equal(scope["view_1"], scope["view_2"])  # two random views, not one
    x, y = next(iter(scope["val"]))
    assert x.shape[1:] == (3, 32, 32) and len(y) == len(x)
