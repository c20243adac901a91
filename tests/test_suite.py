"""The suite's own plumbing: make test's workers share each module fixture (conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

MODULE = """
import os
import pytest

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    with open(os.environ["BUILT_LOG"], "a") as log:
        log.write(os.environ.get("PYTEST_XDIST_WORKER", "main") + "\\n")

@pytest.mark.parametrize("n", range(8))
def test_uses_the_module_fixture(built, n):
    pass

@pytest.mark.parametrize("n", range(8))
def test_alone(n):
    pass
"""

CONFTEST = f"""
import importlib.util
path = {str(REPO / "tests" / "conftest.py")!r}
spec = importlib.util.spec_from_file_location("repo_conftest", path)
repo_conftest = importlib.util.module_from_spec(spec)
spec.loader.exec_module(repo_conftest)
pytest_collection_modifyitems = repo_conftest.pytest_collection_modifyitems
"""


def test_a_module_fixture_is_built_on_one_worker_only(tmp_path):
    """Under `--dist loadgroup` the tests that share a module fixture go to one worker. With
    pytest 9.2 and pytest-xdist 3.8 they did not (xdist writes the group into `item._nodeid`,
    which pytest 9.2 no longer reads), and each worker built every module fixture again."""
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_shared.py").write_text(MODULE)
    log = tmp_path / "built.log"
    env = {**os.environ, "BUILT_LOG": str(log), "PYTEST_ADDOPTS": ""}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2"]
    result = subprocess.run(
        [*command, "--dist", "loadgroup", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "16 passed" in result.stdout
    assert len(log.read_text().split()) == 1, log.read_text()
