"""The lever table of README.md: each lever as `make` runs it on the shared sample, scored
out of fold (clipped as the submission is, with the spread over folds), against the sample's
test labels (`make score`), and timed (wall time of `make submission` / `make blend`, the
features already extracted).

    make features DATA_DIR=../shared/data/dogs-vs-cats-sample TTA=flip \
        BACKBONES="efficientnet_lite0 efficientnet_lite1 efficientnet_lite2"
    make features DATA_DIR=../shared/data/dogs-vs-cats-sample BACKBONES=offline TTA=flip
    .venv/bin/python scripts/levers.py --data-dir ../shared/data/dogs-vs-cats-sample

The blend rows blend the runs of the rows they name; the EXCLUDE row (`--exclude LIST`, a
list of this data set's train files) is also scored on the rows it and its base row both keep.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dogscats import config, runs, submission
from dogscats.backbones import offline_backbones

REPO = config.PROJECT_ROOT
# The rows measured before the input-resolution lever use the Lite models at their native sizes;
# the resolution rows name BACKBONES=offline (the same models at about 1.27x), last one wins.
NATIVE = "efficientnet_lite0 efficientnet_lite1 efficientnet_lite2"
COMMON = [f"BACKBONES={NATIVE}"]
ROWS = [
    ("logreg, standardised, flip", ["NORM=standard", "TTA=flip"]),
    ("logreg, standardised, no flip", ["NORM=standard", "TTA=none"]),
    ("logreg, ssr_l2, flip", ["NORM=ssr_l2", "TTA=flip"]),
    ("logreg, ssr_l2, no flip", ["NORM=ssr_l2", "TTA=none"]),
    *(
        (
            f"lite{k} alone, logreg, ssr_l2, no flip",
            [f"BACKBONES=efficientnet_lite{k}", "TTA=none"],
        )
        for k in range(3)
    ),
    ("keras, flip", ["HEAD=keras", "TTA=flip"]),
    ("keras, no flip", ["HEAD=keras", "TTA=none"]),
    ("1.27x input sizes, logreg, ssr_l2, no flip", ["BACKBONES=offline", "TTA=none"]),
    ("1.27x input sizes, logreg, ssr_l2, flip", ["BACKBONES=offline", "TTA=flip"]),
    *(
        (f"{name} alone, logreg, ssr_l2, no flip", [f"BACKBONES={name}", "TTA=none"])
        for name in offline_backbones()
    ),
]


def make(*args: str) -> tuple[str, float]:
    start = time.perf_counter()
    result = subprocess.run(
        ["make", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True
    )
    if result.returncode:
        sys.exit(f"make {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout, time.perf_counter() - start


def make_var(name: str, *args: str) -> str:
    return make(f"print-{name}", *args)[0].strip()


def clipped_scores(run: runs.Run, rows: np.ndarray | None = None) -> tuple[float, float]:
    """Out-of-fold log loss at the clip the submission uses, and its std over folds."""
    y, p, folds = (run.oof[c].to_numpy() for c in ("label", "pred", "fold"))
    c = submission.choose_clip(y, p)
    rows = np.ones(len(y), bool) if rows is None else rows
    loss = submission.log_loss(y[rows], submission.clip(p[rows], c))
    per_fold = [
        submission.log_loss(y[rows & (folds == k)], submission.clip(p[rows & (folds == k)], c))
        for k in np.unique(folds)
    ]
    return loss, float(np.std(per_fold))


def evaluate(label: str, target: str, variables: list[str], extra: list[str]) -> dict:
    args = [target, *variables, *extra]
    _, seconds = make(*args)
    prefix = "BLEND_" if target == "blend" else ""
    run_dir = REPO / make_var(f"{prefix}DIR" if prefix else "RUN_DIR", *args[1:])
    csv = make_var(f"{prefix}SUBMISSION" if prefix else "SUBMISSION", *args[1:])
    score = make("-s", "score", *args[1:], f"SUBMISSION={csv}")[0].strip()
    test = dict(part.split("=") for part in score.split())
    run = runs.read_run(run_dir)
    oof, spread = clipped_scores(run)
    return {
        "label": label,
        "run": run,
        "oof": oof,
        "spread": spread,
        "test": float(test["log_loss"]),
        "accuracy": float(test["accuracy"]),
        "seconds": seconds,
    }


def row(r: dict, note: str = "") -> str:
    return (
        f"| {r['label']} | {r['oof']:.4f} ± {r['spread']:.4f} | {r['test']:.4f} | "
        f"{r['accuracy']:.4f} | {r['seconds']:.0f} s | {note} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--exclude", type=Path, help="an EXCLUDE list of this data set")
    parser.add_argument(
        "--make", nargs=argparse.REMAINDER, default=[], help="more make arguments (last)"
    )
    args = parser.parse_args()
    extra = [f"DATA_DIR={args.data_dir}", f"LABELS={args.data_dir / 'test_labels.csv'}"]
    extra += args.make
    print("| lever | OOF log loss ± fold std | test log loss | test acc | time | note |")
    print("| --- | --- | --- | --- | --- | --- |")
    done = {}
    for label, variables in ROWS:
        done[label] = evaluate(label, "submission", [*COMMON, *variables], extra)  # last wins
        print(row(done[label]), flush=True)
    blends = [
        (
            "blend: logreg ssr_l2 flip + no flip",
            ["logreg, ssr_l2, flip", "logreg, ssr_l2, no flip"],
        ),
        ("blend: every run above", list(done)),
    ]
    for label, parts in blends:
        names = " ".join(done[p]["run"].path.name for p in parts)
        r = evaluate(label, "blend", [*COMMON, f"RUNS={names}"], extra)
        weights = r["run"].metrics["weights"]
        note = "weights " + ", ".join(f"{w:.2f}" for w in weights.values())
        print(row(r, note), flush=True)
    if args.exclude:
        base_label = "logreg, ssr_l2, no flip"
        base = done[base_label]
        r = evaluate(
            f"{base_label}, EXCLUDE",
            "submission",
            [*COMMON, *dict(ROWS)[base_label], f"EXCLUDE={args.exclude}"],
            extra,
        )
        kept = ~np.isin(base["run"].oof["id"], r["run"].metrics["excluded"])
        both = clipped_scores(base["run"], kept)[0], clipped_scores(r["run"], kept)[0]
        note = f"on the {kept.sum()} rows both keep: {both[0]:.4f} -> {both[1]:.4f}"
        print(row(r, note), flush=True)


if __name__ == "__main__":
    main()
