"""The lever table of README.md: each lever as `make` runs it, scored out of fold (clipped as
the submission is), against the data set's test labels (`make score`), and timed (wall time of
the make, the features already extracted). With several fold seeds (`--seeds`) each lever
runs once per seed and its row shows the mean over seeds with their spread (std), which is
how a lever is judged on the dev set (README, "make best"); with one seed the spread is over
folds.

    make features DATA_DIR=../shared/data/dogs-vs-cats-sample TTA=flip \
        BACKBONES="efficientnet_lite0 efficientnet_lite1 efficientnet_lite2"
    make features DATA_DIR=../shared/data/dogs-vs-cats-sample BACKBONES=offline TTA=flip
    .venv/bin/python scripts/levers.py --data-dir ../shared/data/dogs-vs-cats-sample
    # fine-tuning levers on the dev set, 3 fold seeds (each `make best`: 20-30 min per seed)
    .venv/bin/python scripts/levers.py --data-dir /work/dev --seeds 2017 1 2 --rows best

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
# `make best` variants (the frozen runs, each offline backbone fine-tuned, their blend): a row
# per lever, picked with --rows best. The first three were measured before the second frozen
# run existed (BEST_FROZEN=); ten epochs is the default, named so that the runs keep their names.
EARLIER = ["BACKBONES=offline", "TTA=none", "FT_EPOCHS=4", "BEST_FROZEN="]
RECIPE = ["BACKBONES=offline", "TTA=none", "FT_EPOCHS=10"]
LITE2_LARGE_TOO = "FT_BACKBONES=offline efficientnet_lite2_456"  # measured, not the default
BEST_ROWS = [
    ("make best: 1 block, 4 epochs", EARLIER),
    ("make best: 2 blocks, 4 epochs", [*EARLIER, "BLOCKS=2"]),
    ("make best: 1 block, 10 epochs", [*EARLIER, "FT_EPOCHS=10"]),
    ("make best (1 block, 10 epochs, the second frozen run)", RECIPE),
    ("make best, FT_STOP=0.3", [*RECIPE, "FT_STOP=0.3"]),
    ("make best, Lite2 @456 fine-tuned too", [*RECIPE, LITE2_LARGE_TOO]),
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
    run_dir, csv = (make_var(name, *args[1:]) for name in OUTPUTS[target])
    score = make("-s", "score", *args[1:], f"SUBMISSION={csv}")[0].strip()
    test = dict(part.split("=") for part in score.split())
    run = runs.read_run(REPO / run_dir)
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


# What each target writes: the make variables naming its run folder and its submission.
OUTPUTS = {
    "submission": ("RUN_DIR", "SUBMISSION"),
    "blend": ("BLEND_DIR", "BLEND_SUBMISSION"),
    "best": ("BEST_BLEND_DIR", "BEST_SUBMISSION"),
}


def over_seeds(results: list[dict]) -> dict:
    """One row from a lever's runs with several fold seeds: means, and the spread (std) of the
    out-of-fold log loss over seeds; one seed's row as it is."""
    if len(results) == 1:
        return results[0]
    mean = {key: float(np.mean([r[key] for r in results])) for key in NUMBERS}
    spread = float(np.std([r["oof"] for r in results]))
    return {**results[0], **mean, "spread": spread, "seeds": results}


NUMBERS = ("oof", "test", "accuracy", "seconds")


def per_seed(results: dict) -> list[dict]:
    return results.get("seeds", [results])


def row(r: dict, note: str = "") -> str:
    seeds = per_seed(r)
    if len(seeds) > 1:
        note = (
            " / ".join(f"{s['oof']:.4f}" for s in seeds)
            + " by seed"
            + (f"; {note}" if note else "")
        )
    return (
        f"| {r['label']} | {r['oof']:.4f} ± {r['spread']:.4f} | {r['test']:.4f} | "
        f"{r['accuracy']:.4f} | {r['seconds']:.0f} s | {note} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--exclude", type=Path, help="an EXCLUDE list of this data set")
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[config.SEED], help="fold seeds (SEED=)"
    )
    parser.add_argument(
        "--rows",
        choices=["frozen", "best"],
        default="frozen",
        help="frozen: the heads' levers (and their blends); best: make best's levers",
    )
    parser.add_argument(
        "--make", nargs=argparse.REMAINDER, default=[], help="more make arguments (last)"
    )
    args = parser.parse_args()
    extra = [f"DATA_DIR={args.data_dir}", f"LABELS={args.data_dir / 'test_labels.csv'}"]
    extra += args.make
    spread = "seeds" if len(args.seeds) > 1 else "folds"
    print(f"| lever | OOF log loss ± std over {spread} | test log loss | test acc | time | note |")
    print("| --- | --- | --- | --- | --- | --- |")

    def lever(label: str, target: str, variables: list[str], seeds=args.seeds) -> dict:
        runs_ = [evaluate(label, target, [*variables, f"SEED={s}"], extra) for s in seeds]
        return over_seeds(runs_)

    if args.rows == "best":
        for label, variables in BEST_ROWS:
            print(row(lever(label, "best", variables)), flush=True)
        return
    done = {}
    for label, variables in ROWS:
        done[label] = lever(label, "submission", [*COMMON, *variables])  # last wins
        print(row(done[label]), flush=True)
    blends = [
        (
            "blend: logreg ssr_l2 flip + no flip",
            ["logreg, ssr_l2, flip", "logreg, ssr_l2, no flip"],
        ),
        ("blend: every run above", list(done)),
    ]
    for label, parts in blends:
        results = []
        for k, seed in enumerate(args.seeds):
            names = " ".join(per_seed(done[p])[k]["run"].path.name for p in parts)
            results.append(lever(label, "blend", [*COMMON, f"RUNS={names}"], [seed]))
        r = over_seeds(results)
        weights = r["run"].metrics["weights"]
        note = "weights " + ", ".join(f"{w:.2f}" for w in weights.values())
        print(row(r, note), flush=True)
    if args.exclude:
        base_label = "logreg, ssr_l2, no flip"
        base = per_seed(done[base_label])[0]
        variables = [*COMMON, *dict(ROWS)[base_label], f"EXCLUDE={args.exclude}"]
        r = lever(f"{base_label}, EXCLUDE", "submission", variables, args.seeds[:1])
        kept = ~np.isin(base["run"].oof["id"], r["run"].metrics["excluded"])
        both = clipped_scores(base["run"], kept)[0], clipped_scores(r["run"], kept)[0]
        note = f"on the {kept.sum()} rows both keep: {both[0]:.4f} -> {both[1]:.4f}"
        print(row(r, note), flush=True)


if __name__ == "__main__":
    main()
