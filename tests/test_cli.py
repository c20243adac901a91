"""cli.main: a user error is one line without a traceback (DEBUG=1 shows it); Ctrl-C stops
quietly and says that a re-run resumes."""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest
from conftest import REPO

from dogscats import cli, submission


def run_cli(*args: str, debug: bool = False) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    if debug:
        env["DEBUG"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "dogscats.cli", *args], capture_output=True, text=True, env=env
    )


def test_a_user_error_is_one_line_naming_the_file_and_the_fix(tmp_path):
    sub = tmp_path / "sub.csv"
    sub.write_text("id,lable\n1,0.5\n")
    labels = tmp_path / "labels.csv"
    labels.write_text("id,label\n1,1\n")
    result = run_cli("score", "--submission", str(sub), "--labels", str(labels))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: Submission {sub} rejected: the header must be")

    debug = run_cli("score", "--submission", str(sub), "--labels", str(labels), debug=True)
    assert "Traceback" in debug.stderr and "SubmissionError" in debug.stderr


def test_ctrl_c_stops_quietly_saying_a_rerun_resumes(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(submission, "score", interrupted)
    assert cli.main(["score", "--submission", "s.csv", "--labels", "l.csv"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "run the same command again to resume" in err
    assert err.strip().count("\n") == 0


@pytest.mark.parametrize(
    ("code", "fix"),
    [
        (errno.ENOSPC, "free some disk space"),
        (errno.EACCES, "make it writable"),
        (errno.EROFS, "the disk is read-only"),
    ],
)
def test_system_errors_get_the_file_and_the_fix(monkeypatch, capsys, code, fix):
    def fails(*args, **kwargs):
        raise OSError(code, "the system's words", "/some/file")

    monkeypatch.setattr(submission, "score", fails)
    assert cli.main(["score", "--submission", "s.csv", "--labels", "l.csv"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the system's words: /some/file; {fix}")
    assert err.count("\n") == 1
