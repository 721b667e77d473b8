"""The method files are read as documentation (../shared/STYLE.md): each holds its method and its
training loop in one sitting, shares only ffcv_ssl_common.py, and copies nothing of it back. What
stays identical across the four files on purpose (the recipe's shape, the loop) is checked to stay
identical, so that `diff simclr.py vicreg.py` shows the method and a fix in one file cannot
silently miss the others; and --help reads as sentences."""

import ast
import contextlib
import dataclasses
import importlib
import io
import os
import re

import pytest

from conftest import ROOT

FILES = ["simclr.py", "barlowtwins.py", "vicreg.py", "instance_simclr.py"]
MODULES = [f[:-3] for f in FILES]
# Identical in all four on purpose: the projector's building block and the optimiser recipe's
# shape (barlowtwins.py sets two learning rates in set_learning_rates).
SAME = ["mlp", "param_groups", "make_optimizer", "learning_rate", "Model"]
# The sections in the order every method file has them (STYLE rule 1); the model class and the
# loss function between validate and param_groups.
ORDER = ["METHOD", "Model", "Optim", "Loss", "Args", "validate", "mlp", "param_groups",
         "make_optimizer", "learning_rate", "set_learning_rates", "main"]


def definitions(path):
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = ast.unparse(node)
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            out[node.targets[0].id] = ast.unparse(node)
    return out


def top_level_imports(path):
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    for node in tree.body:
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.module.split(".")[0]


@pytest.mark.parametrize("path", FILES)
def test_a_method_file_is_read_in_one_sitting(path):
    """STYLE rule 1: a few hundred lines (450 at most, 500 for instance SimCLR's patches), main()
    at most 110 lines, its sections in the same order as the other files'."""
    source = open(os.path.join(ROOT, path)).read()
    limit = 500 if path == "instance_simclr.py" else 450
    assert len(source.splitlines()) <= limit
    tree = ast.parse(source)
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 110
    names = list(definitions(path))
    assert [n for n in names if n in ORDER] == ORDER, names
    assert all(len(line) <= 100 for line in source.splitlines())


@pytest.mark.parametrize("path", FILES)
def test_it_shares_only_the_common_module_and_copies_nothing_of_it(path):
    """No method file imports another one (or probe.py), and none defines again what
    ffcv_ssl_common.py defines (a second copy of the infrastructure), by name or by body."""
    local = {"ffcv_ssl_common"} | {m for m in MODULES + ["probe", "write_beton"]}
    assert [m for m in top_level_imports(path) if m in local] == ["ffcv_ssl_common"]
    common = definitions("ffcv_ssl_common.py")
    own = definitions(path)
    assert not set(own) & set(common) - {"main"}, set(own) & set(common)
    bodies = {body.split("\n", 1)[-1] for body in common.values() if "\n" in body}
    copied = [name for name, body in own.items() if "\n" in body and
              body.split("\n", 1)[-1] in bodies]
    assert not copied, copied


@pytest.mark.parametrize("path", FILES[1:])
def test_what_stays_identical_on_purpose(path):
    ref, other = definitions(FILES[0]), definitions(path)
    for name in SAME:
        if name in ref:
            assert name in other, f"{path} lacks {name}"
            if name == "Model":  # the projector's default and docstring are the method's
                strip = re.compile(r"projector_dims: .*", re.S)
                assert strip.sub("", other[name]) == strip.sub("", ref[name])
            else:
                assert other[name] == ref[name], f"{name} differs between {FILES[0]} and {path}"


def test_main_is_the_same_apart_from_the_method():
    """main() differs only where the method does: the model's class, and instance SimCLR's
    patches and extra batches."""
    mains = {path: definitions(path)["main"].splitlines() for path in FILES}
    for path in ("barlowtwins.py", "vicreg.py"):
        changed = [line for line in mains[path] if line not in mains["simclr.py"]]
        assert len(changed) == 1 and "model = " in changed[0], changed
    changed = [line for line in mains["instance_simclr.py"] if line not in mains["simclr.py"]]
    assert len(changed) <= 12, changed


def dataclasses_of(module):
    """The settings classes of a script: its Args and the groups in it, recursively."""
    found, todo = [], [module.Args]
    while todo:
        cls = todo.pop(0)
        found.append(cls)
        todo += [type(f.default_factory()) for f in dataclasses.fields(cls)
                 if f.default_factory is not dataclasses.MISSING
                 and dataclasses.is_dataclass(f.default_factory())]
    return found


@pytest.mark.parametrize("name", MODULES + ["probe", "write_beton"])
def test_every_setting_is_documented(name):
    """Each field of every settings dataclass a script uses (its own and the common module's
    groups) has a docstring under it: tyro turns them into --help."""
    module = importlib.import_module(name)
    for cls in dataclasses_of(module):
        tree = ast.parse(open(importlib.import_module(cls.__module__).__file__).read())
        node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
                    and n.name == cls.__name__)
        for i, item in enumerate(node.body):
            if isinstance(item, ast.AnnAssign):
                doc = node.body[i + 1] if i + 1 < len(node.body) else None
                assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and \
                    isinstance(doc.value.value, str), f"{cls.__name__}.{item.target.id}: no docstring"


def help_text(module):
    import tyro
    import tyro._docstrings  # noqa: F401 (used by the caller)

    out = io.StringIO()
    os.environ["COLUMNS"] = "100"  # one column of option boxes
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            tyro.cli(module.Args, args=["--help"], description=module.__doc__)
    finally:
        del os.environ["COLUMNS"]
    return out.getvalue()


@pytest.mark.parametrize("name", MODULES + ["probe", "write_beton"])
def test_help_shows_the_docstring_groups_the_flags_and_keeps_sentences_whole(name):
    """`--help` starts with the file's docstring, lists the flags in groups (data, model, optim,
    loss, numerics, run for a method file), and shows each setting's docstring as one paragraph:
    tyro 1.0.17 broke every help at the source's line breaks (ffcv_ssl_common._join_lines)."""
    module = importlib.import_module(name)
    text = help_text(module)
    first = module.__doc__.strip().splitlines()[0]
    assert first in text
    if name in MODULES:
        for group in ("data", "model", "optim", "loss", "numerics", "run"):
            assert re.search(rf"(^|\s){group} options\s", text), group
        assert "--out-dir" in text and "--run.out-dir" not in text  # the flags keep their names
        assert "--view1.resolution" in text or "--resolution" in text
    helps = [line.split("│")[1] if "│" in line else line for line in text.splitlines()]
    joined = " ".join(" ".join(h.split()) for h in helps)
    for cls in dataclasses_of(module):
        for f in dataclasses.fields(cls):
            import tyro._docstrings

            doc = tyro._docstrings.get_field_docstring(cls, f.name, ())
            assert doc and "\n" not in doc, (cls.__name__, f.name, doc)
            assert " ".join(doc.split()) in joined, (cls.__name__, f.name)


def test_the_source_s_line_breaks_go_and_the_commands_of_a_docstring_stay():
    from ffcv_ssl_common import _join_lines

    field = "A sentence that\n    goes on (and --on)\n    to its end.\n\n    A second paragraph."
    assert _join_lines(field) == "A sentence that goes on (and --on) to its end.\n\n" \
                                 "A second paragraph."
    module = "Title.\n\nA sentence\nthat goes on.\n\n    python a.py   # one\n    python b.py\n"
    assert _join_lines(module) == "Title.\n\nA sentence that goes on.\n\n" \
                                  "    python a.py   # one\n    python b.py"
