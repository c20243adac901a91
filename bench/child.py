"""Each measured piece of work runs in a fresh interpreter (`python bench/tasks.py REQUEST`), so
that its peak RSS is its own and no TensorFlow state leaks between measurements. This side
imports the standard library only."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULT_MARK = "@@bench-result@@ "
TASKS_SCRIPT = Path(__file__).resolve().with_name("tasks.py")


def in_child(
    task: str, sample_memory: bool = False, env: dict | None = None, **kwargs: object
) -> dict:
    """Run `task(**kwargs)` of tasks.py in a fresh interpreter (with `env`'s variables set,
    or removed where None); add wall time and, if asked, the peaks of the RSS and PSS summed
    over its process tree (sampled, so a short spike can be missed)."""
    request = json.dumps({"task": task, "kwargs": kwargs})
    changes = {"TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    env = {**os.environ, **{k: v for k, v in changes.items() if v is not None}}
    for name in [k for k, v in changes.items() if v is None]:
        env.pop(name, None)
    start = time.perf_counter()
    with subprocess.Popen(
        [sys.executable, str(TASKS_SCRIPT), request],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        sampler = TreeMemory(proc.pid) if sample_memory else None
        out, err = proc.communicate()
        if sampler:
            sampler.stop()
    lines = [line for line in out.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench task {task} failed (exit {proc.returncode}):\n{err[-3000:]}")
    result = json.loads(lines[-1][len(RESULT_MARK) :])
    result["process_wall_s"] = time.perf_counter() - start
    if sampler:
        result["tree_rss_mb"] = sampler.peak_kb["Rss"] / 1024
        result["tree_pss_mb"] = sampler.peak_kb["Pss"] / 1024
    return result


class TreeMemory(threading.Thread):
    """Samples the memory of a process and all its descendants; keeps the peak sums.

    Two sums: RSS counts shared pages (libraries) once per process, so it overstates a pool;
    PSS divides shared pages among every process mapping them, other users' processes
    included, so it can understate. The truth lies between.
    """

    def __init__(self, root: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak_kb = {"Rss": 0, "Pss": 0}
        self._done = threading.Event()
        self.start()

    def run(self) -> None:
        while not self._done.is_set():
            sample = [_rollup_kb(pid) for pid in _tree(self.root)]
            for key in self.peak_kb:
                self.peak_kb[key] = max(self.peak_kb[key], sum(s.get(key, 0) for s in sample))
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


def _tree(root: int) -> list[int]:
    """root and its live descendants, from the parent ids in /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _rollup_kb(pid: int) -> dict[str, int]:
    """Rss and Pss (kB) of one process from /proc/<pid>/smaps_rollup; empty if it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {}
    return {k: int(v) for k, v in re.findall(r"^(Rss|Pss):\s+(\d+) kB", text, re.MULTILINE)}
