"""`make bench` on a tiny synthetic data set: every stage runs and reports, no timing asserted.

The figures of a quick run mean nothing; the test only keeps the tool from rotting. The
benchmark lives in the top-level bench/ folder, outside the package: its modules are imported
from there, as `python bench/run.py` imports them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, write_kaggle_dataset

from dogscats import config

sys.path.insert(0, str(REPO / "bench"))
import plan  # noqa: E402
import report  # noqa: E402
import run as bench  # noqa: E402
import stages  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    data_dir = write_kaggle_dataset(tmp_path_factory.mktemp("bench") / "comp", n_train=8, n_test=6)
    out = tmp_path_factory.mktemp("report") / "REPORT.md"
    results = bench.run(data_dir, out, quick=True)
    return data_dir, out, results


def positive_numbers(value):
    """Every int/float inside a nested result."""
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from positive_numbers(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from positive_numbers(item)


def test_every_stage_reports_its_section_and_target_rows(quick_run):
    _, out, results = quick_run
    assert set(results) == set(plan.STAGES)
    text = out.read_text()
    for title, _, _ in report.SECTIONS:
        assert f"## {title}" in text
    for heading in ("## Machine and versions", "## Targets"):
        assert heading in text
    for row in (
        "preprocess (22 images, 1x) >= 0.85 x bare parallel loop",
        "preprocess (44 images, 2x) >= 1.8 x seeds' single loop",
        "preprocess (22 images, 500x375) >= 0.85 x bare parallel loop",
        "features efficientnet_lite0 >= 0.90 x bare forward",
        "preprocess peak RSS 4N within 15% of N",
        "features s/image 4N within 10% of N",
        "preprocess peak RSS < 1.5 GB",
        "warm make submission < 3 s, no TensorFlow",
    ):
        assert row in text
    assert "Failed" not in text and not out.with_name(out.name + ".tmp").exists()


def test_measured_figures_are_positive(quick_run):
    _, _, results = quick_run
    scales = results["preprocess"]["scales"]
    assert [scales["1x"]["images"], scales["2x"]["images"]] == [8 * 2 + 6, 2 * (8 * 2 + 6)]
    assert scales["500x375"]["enlarged"]["images"] == 8 * 2 + 6
    for pre in scales.values():
        assert set(pre["runs"]) == set(stages.PREPROCESS_VARIANTS)
        assert all(s > 0 for runs in pre["runs"].values() for s in runs)
        assert all(cpu > 0 for cpu in pre["cpu"].values())
    features = results["features"]["backbones"]["efficientnet_lite0"]
    # Each positive; not compared: two wall-clock times taken apart swap under load.
    assert features["pipeline_s"] > 0 and features["fixed_s"] > 0 and features["bare_s"] > 0
    assert features["runs"] == 1 and features["cpu_ratio"] > 0
    for point in results["scaling"]["points"].values():
        for stage in ("preprocess", "features"):
            assert point[stage]["seconds"] > 0 and point[stage]["rss_self_mb"] > 0
            assert point[stage]["tree_rss_mb"] > 0 and point[stage]["tree_pss_mb"] > 0
    assert results["scaling"]["points"]["4N"]["features"]["images"] == 4 * (8 + 4)
    allocator = results["allocator"]
    assert allocator["images"] == 8 + 4 and set(allocator["rate"]) == {"default", "bfc"}
    assert all(f > 0 for f in allocator["faults_per_image"].values())
    (tuned,) = results["finetune"]["variants"].values()
    assert len(tuned["epochs"]) == 2 and tuned["images"] == 3 * 4 - 1  # a partial last batch
    assert tuned["train_rate"] > 0 and tuned["forward_rate"] > 0
    assert all(e["steps"] == 3 and e["steps_s"] > 0 for e in tuned["epochs"])
    precision = results["precision"]
    assert precision["diff"]["max_abs_value"] > 0
    assert 0 < precision["heads"]["float32"]["log_loss"] < 10
    assert set(precision["speedups"]) == {"efficientnet_lite0"}
    assert all(e["seconds"] > 0 and e["cpu_s"] > 0 for e in precision["extract"].values())
    lite = results["litert"]["backbones"]["efficientnet_lite0"]
    assert lite["speedup"] > 0 and lite["max_abs_diff"] <= 1e-4 and lite["input_size"] == 224
    derived = results["cut_cache"]
    assert derived["images"] == 8 * 2 + 6 and derived["lower_cut"] == "block13_out"
    assert derived["from_images_s"] > 0 and derived["derived_s"] > 0
    assert derived["max_abs_diff"] <= 1e-4
    numbers = list(positive_numbers({k: v for k, v in results.items() if k != "precision"}))
    assert numbers and all(n >= 0 for n in numbers)


def test_warm_make_submission_is_checked_for_tensorflow(quick_run):
    data_dir, out, results = quick_run
    sub = results["submission"]
    assert sub["warm_up_to_date"] and sub["warm_pythons"] >= 1 and sub["warm_modules"] > 0
    assert set(sub["cold"]) == {"preprocess", "features", "train", "submission"}
    assert re.search(r"warm\*\* \| \*\*\d+\.\d\d", out.read_text())
    # The cold run's outputs live in the repo under their own dataset key: all removed.
    assert len(sub["outputs"]) == 2
    for path in sub["outputs"]:
        assert path.startswith(str(config.PROJECT_ROOT)) and not os.path.exists(path)


def test_unknown_stage_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Unknown bench stage"):
        bench.run(tmp_path, tmp_path / "r.md", quick=True, stages=["warp"])


def test_runs_as_a_script_from_any_folder(tmp_path):
    """`python bench/run.py` finds its sibling modules wherever it is started from."""
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0 and "--stages" in result.stdout


def test_symlinked_data_set_cycles_the_source_files(tmp_path):
    source = write_kaggle_dataset(tmp_path / "src", n_train=2, n_test=2)
    linked = plan.symlink_dataset(source, tmp_path / "big", n_train=8, n_test=5)
    train = sorted(p.name for p in (linked / "train").iterdir())
    assert len(train) == 8 and train.count("cat.3.jpg") == 1
    assert all(p.is_symlink() for p in (linked / "train").iterdir())
    assert (linked / "test" / "5.jpg").resolve() == (source / "test" / "1.jpg").resolve()
