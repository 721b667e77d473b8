"""experiments/: each claim's script end to end with --quick (a few steps per run), as a user runs
it: cells cached by their settings (a second run trains nothing), the results files written, the
verdict one of agrees / disagrees / inconclusive; and the shared rules (lab.py) against
hand-computed values."""

import importlib
import json
import os
import sys

import pytest
import tyro

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import lab  # noqa: E402

SCRIPTS = ["claim_batch_size", "claim_augmentations", "claim_projector", "claim_probing",
           "claim_instance"]


@pytest.fixture(scope="module")
def colour(idx_dir, tmp_path_factory):
    import write_beton

    out = tmp_path_factory.mktemp("colour")
    write_beton.main(write_beton.Args(dataset="fashion-mnist-colour", data_dir=str(idx_dir),
                                      out_dir=str(out), num_workers=1))
    return {s: str(out / f"fashion-mnist-colour_{s}.beton") for s in ("train", "val")}


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_claim_runs_end_to_end_and_caches_its_cells(script, betons, colour, tmp_path,
                                                         monkeypatch):
    data = colour if script == "claim_augmentations" else betons
    module = importlib.import_module(script)
    flags = ["--quick", "--train-beton", data["train"], "--val-beton", data["val"],
             "--out-dir", str(tmp_path)]
    module.main(tyro.cli(module.Args, args=flags))
    name = script.removeprefix("claim_")
    folder = tmp_path / name
    results = json.load(open(folder / "results.json"))
    assert results["verdict"].split()[0].rstrip(":") in ("agrees", "disagrees", "inconclusive")
    assert (folder / f"{name}.png").stat().st_size > 5000
    assert "QUICK" in (folder / "table.md").read_text()
    cells = sorted(p.name for p in (folder / "cells").iterdir())
    launched, real = [], lab.subprocess.run

    def no_training(cmd, *a, **k):
        if cmd[0] == "bash":  # a method file through its recipe
            launched.append(cmd)
        return real(cmd, *a, **k)

    monkeypatch.setattr(lab.subprocess, "run", no_training)
    module.main(tyro.cli(module.Args, args=flags))  # again: every cell from the cache
    assert launched == [] and sorted(p.name for p in (folder / "cells").iterdir()) == cells


def test_the_rules_of_the_verdicts():
    assert lab.mean_sd([80.0, 82.0]) == (81.0, pytest.approx(1.4142, abs=1e-4))
    assert not lab.differs([80.0, 82.0], [81.5, 83.5])  # 0.5 apart, spreads 1.41 each
    assert lab.differs([80.0, 80.2], [82.0, 82.2])
    configs = {"a": [{"linear": {"holdout": 0.8, "test": 0.9}}],
               "b": [{"linear": {"holdout": 0.85, "test": 0.1}}]}
    assert lab.best(configs) == "b"  # on the holdout, never the test split
    assert lab.fmt([80.0, 82.0]) == "81.00 ± 1.41"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_setting_is_documented_and_help_reads(script):
    """As the method files (tests/test_style.py): a docstring under every field, --help with the
    script's docstring and whole sentences."""
    import test_style

    test_style.test_every_setting_is_documented(script)
    test_style.test_help_shows_the_docstring_groups_the_flags_and_keeps_sentences_whole(script)
