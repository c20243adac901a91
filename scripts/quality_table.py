"""The quality table of README.md: every backbone alone and together, each head, with and
without flip TTA, scored out-of-fold and against the sample's test labels.

Needs the flip feature files (they hold the plain features too) of the backbones it names
(default: BACKBONES=offline; README's table was made with the native sizes):
    make features DATA_DIR=../shared/data/dogs-vs-cats-sample BACKBONES="$NAMES" TTA=flip
    .venv/bin/python scripts/quality_table.py --data-dir ../shared/data/dogs-vs-cats-sample \
        --backbones $NAMES
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dogscats import config, submission, train
from dogscats.backbones import offline_backbones


def quiet(*_: object) -> None:
    pass


def evaluate(data_dir: Path, names: list[str], head: str, tta: str, folds: int) -> dict:
    files = [config.feature_path(data_dir, n, tta="flip") for n in names]
    run = config.head_run_name(names, head, tta=tta)
    run_dir = config.models_dir(data_dir) / "quality" / run
    csv = config.submissions_dir(data_dir) / "quality" / f"{run}.csv"
    train.train(files, run_dir, head=head, tta=tta, n_folds=folds, log=quiet)
    cv = submission.write_submission(run_dir, data_dir / "sample_submission.csv", csv, log=quiet)
    test = submission.score(csv, data_dir / "test_labels.csv")
    return {"cv": cv, "test": test}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--heads", nargs="+", default=["logreg", "keras", "zeroshot"])
    parser.add_argument("--backbones", nargs="+", default=offline_backbones())
    args = parser.parse_args()
    groups = [[n] for n in args.backbones] + [args.backbones]
    print("| backbones | head | TTA | OOF log loss | OOF acc | test log loss | test acc |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for names in groups:
        for head in args.heads:
            for tta in ("none", "flip"):
                r = evaluate(args.data_dir, names, head, tta, args.folds)
                print(
                    f"| {' + '.join(n.replace('efficientnet_', '') for n in names)} | {head} "
                    f"| {tta} | {r['cv']['cv_log_loss']:.4f} | {r['cv']['cv_accuracy']:.4f} "
                    f"| {r['test']['log_loss']:.4f} | {r['test']['accuracy']:.4f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
