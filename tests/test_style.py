"""The four method files share their skeleton on purpose (one file per method, read as
documentation): the infrastructure must stay identical, so that `diff simclr.py vicreg.py` shows
the method and nothing else, and a fix in one file cannot silently miss the others."""

import ast
import os

import pytest

from conftest import ROOT

FILES = ["simclr.py", "barlowtwins.py", "vicreg.py", "instance_simclr.py"]
SHARED = ["ScaledResNet", "make_backbone", "stem_spec", "mlp", "probe_loss_of", "LARS",
          "param_groups", "make_optimizer", "learning_rate", "evaluate", "knn_leave_one_out",
          "rankme", "MONITOR_IMAGES", "resolve_stem", "global_mean", "plot_curves",
          "bf16_is_fast", "autocast_dtype", "PRECISION_NAMES", "setup_processes",
          "save_provenance", "save_atomic", "flat_settings", "load_checkpoint", "start_fresh",
          "catch_preemption", "agree", "check_replicas", "RUN_ONLY", "CHECKPOINT_KEYS", "RESNETS",
          "epoch_resolution"]


def definitions(path):
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = ast.unparse(node)
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            out[node.targets[0].id] = ast.unparse(node)
    return out


@pytest.mark.parametrize("path", FILES[1:])
def test_shared_infrastructure_is_identical(path):
    ref, other = definitions(FILES[0]), definitions(path)
    for name in SHARED:
        assert name in other, f"{path} lacks {name}"
        assert other[name] == ref[name], f"{name} differs between {FILES[0]} and {path}"


def test_probe_builds_the_method_files_scaled_resnet():
    """probe.py rebuilds a --width backbone with its own copy of the class: the same code."""
    assert definitions("probe.py")["ScaledResNet"] == definitions(FILES[0])["ScaledResNet"]


@pytest.mark.parametrize("path", FILES)
def test_every_setting_is_documented(path):
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    args = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args")
    body = args.body
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign):
            doc = body[i + 1] if i + 1 < len(body) else None
            assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and \
                isinstance(doc.value.value, str), f"{path}: Args.{node.target.id} has no docstring"


def test_main_is_the_same_apart_from_the_method():
    """main() differs only where the method does: instance SimCLR's patches and extra batches."""
    mains = {path: definitions(path)["main"] for path in FILES}
    for path in ("barlowtwins.py", "vicreg.py"):
        changed = [line for line in mains[path].splitlines()
                   if line not in mains["simclr.py"].splitlines()]
        assert len(changed) <= 2, changed  # the model's class name, the NaN hint


@pytest.mark.parametrize("path", ["probe.py", "write_beton.py"])
def test_every_tool_setting_is_documented(path):
    test_every_setting_is_documented(path)
