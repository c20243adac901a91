"""scripts/levers.py: a lever run with several fold seeds is one row of means, its spread the
std of the seeds' out-of-fold log losses; make names what `make best` writes for it to read."""

from __future__ import annotations

import importlib.util
import subprocess

import numpy as np
import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def levers():
    spec = importlib.util.spec_from_file_location("levers", REPO / "scripts" / "levers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _result(oof: float, test: float) -> dict:
    return {
        "label": "lever",
        "run": None,
        "oof": oof,
        "spread": 0.004,
        "test": test,
        "accuracy": 0.99,
        "seconds": 60.0,
    }


def test_seeds_make_one_row_of_means_with_their_spread(levers):
    seeds = [_result(0.015, 0.017), _result(0.016, 0.018), _result(0.014, 0.016)]
    row = levers.over_seeds(seeds)
    assert row["oof"] == pytest.approx(0.015) and row["test"] == pytest.approx(0.017)
    assert row["spread"] == pytest.approx(np.std([0.015, 0.016, 0.014]))
    line = levers.row(row)
    assert line.startswith("| lever | 0.0150 ± 0.0008 | 0.0170 |")
    assert "0.0150 / 0.0160 / 0.0140 by seed" in line
    one = levers.over_seeds(seeds[:1])
    assert one["spread"] == 0.004 and "by seed" not in levers.row(one)  # over folds


def test_make_names_what_make_best_writes(tmp_path):
    """levers.py reads make best's blend folder and submission through `make print-BEST_*`."""
    names = {}
    for name in ("BEST_BLEND_DIR", "BEST_SUBMISSION"):
        result = subprocess.run(
            ["make", "-s", f"print-{name}", f"DATA_DIR={tmp_path}", "BACKBONES=offline"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        names[name] = result.stdout.strip()
    assert "/models/blend__" in names["BEST_BLEND_DIR"]
    assert names["BEST_SUBMISSION"].endswith(".csv") and "blend__" in names["BEST_SUBMISSION"]
