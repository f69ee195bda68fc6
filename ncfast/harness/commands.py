"""The ``train``, ``demo`` and ``reproduce`` subcommands of the ``ncfast`` CLI.

Parsing needs no torch; the handlers import it when they train.
"""
import argparse
import dataclasses
import time

from ncfast.analyze import print_on_stdout, write_captured
from ncfast.harness.datasets import DATASETS
from ncfast.harness.demo import DEMO_CONFIG
from ncfast.harness.losses import DEFAULT_SMOOTHING, LOSSES
from ncfast.harness.noise import NOISE_KINDS
from ncfast.harness.training import MODELS, TrainConfig
from ncfast.inputs import plain_markup, tell

DEFAULTS = TrainConfig()

TRAIN_DESCRIPTION = """\
Train a network into the terminal phase (zero error on the noisy training labels) and dump,
at log-spaced epochs, the train and test features of the penultimate layer (and of every layer
of a deep linear head), the classifier's weights and bias, and the noisy and clean labels into
a run folder that `ncfast analyze` measures. Training is seeded and deterministic on CPU. Every
option is checked before training starts. Rerunning the same command on the same folder resumes
an interrupted run from its last checkpoint; a finished run is not trained again."""

DEMO_DESCRIPTION = """\
The main job: train a small 1-D CNN on MNIST-1D (generated locally) with 20% symmetric label noise,
once with cross-entropy and once with label smoothing, into the terminal phase; measure every
dumped checkpoint of both runs; print a side-by-side table (test accuracy, nc1, memorization,
dilation, ...) and write OUT/demo.md, OUT/metrics.json, OUT/metrics.csv and PNG plots (each
metric against epoch for both runs, memorization vs dilation). A few minutes on 2 cores."""

REPRODUCE_DESCRIPTION = """\
Reproduce one claim this project rests on: train a grid of settings x K seeds, decide each of
the claim's statements by the difference of seed means against two standard errors, and write
OUT/report.md (claim, verdict per statement, what the grid can and cannot decide, mean +- std
tables, figures, runtime, every run with its seed and command), OUT/metrics.json,
OUT/metrics.csv and PNG figures. Rerunning the same command on the same OUT resumes: finished
runs are read back, an interrupted one continues from its last checkpoint.
Exits 0 if the claim held, 4 if it did not, 3 if the grid could not decide it.
  memorization-dilation  Nguyen et al. 2023: symmetric label noise 0/0.2/0.4 (and pair-flip
                         in the full grid) x label smoothing alpha 0 to 0.5 x seeds, MLP on
                         MNIST-1D (quick: 36 runs)
  weight-decay           Rangamani & Banburski 2022: bias-free ReLU MLP, square loss, SGD,
                         balanced classes, weight decay 0 to 1e-3 x seeds, on digits and
                         MNIST-1D (quick: 24 runs)
  imbalanced             Dang et al. 2023: unconstrained features, bias-free linear heads of
                         depth 1 and 3, class counts [200, 100, 50, 50], vs the closed form
                         (quick: 6 runs)
--grid quick (the default) fits in 15 minutes on 2 CPU cores; --grid full is the publication
grid, meant for a GPU (taken when torch sees one; --device cuda insists on it)."""


def add_train_options(parser):
    """Add one flag per ``TrainConfig`` option."""
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default=DEFAULTS.dataset,
                      help="mnist1d (generated locally), digits (scikit-learn), gaussian "
                           "(synthetic mixture) or npz (--data-path) (default: %(default)s)")
    data.add_argument("--num-samples", type=int, metavar="N",
                      help="mnist1d: samples before the 80/20 split (default 5000); gaussian: "
                           "training rows (default 1000)")
    data.add_argument("--num-features", type=int, metavar="D",
                      help="gaussian: input dimension (default 32)")
    data.add_argument("--num-classes", type=int, metavar="C",
                      help="gaussian: number of classes (default 4)")
    data.add_argument("--class-counts", type=int, nargs="+", metavar="N_C",
                      help="gaussian: training rows per class, e.g. 200 100 50 50 (imbalance)")
    data.add_argument("--data-path", metavar="FILE",
                      help="npz: file with arrays x (n, ...) and y (n,), optionally x_test, "
                           "y_test (otherwise 20%% is held out)")
    data.add_argument("--balanced", action="store_true",
                      help="cut every split to equal class counts (its smallest class's)")
    data.add_argument("--noise", type=float, default=DEFAULTS.noise, metavar="P",
                      help="fraction of training labels corrupted, in [0, 1); exactly "
                           "round(P*N) rows (default: %(default)s)")
    data.add_argument("--noise-kind", choices=NOISE_KINDS, default=DEFAULTS.noise_kind,
                      help="symmetric: uniform over the other classes; pair: class c becomes "
                           "c+1 (default: %(default)s)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=MODELS, default=DEFAULTS.model,
                       help="mlp: ReLU MLP; cnn: small 1-D CNN (MNIST-1D); ufm: unconstrained "
                            "features, one free feature row per training sample "
                            "(default: %(default)s)")
    model.add_argument("--width", type=int, default=DEFAULTS.width,
                       help="feature dimension at the head's input (default: %(default)s)")
    model.add_argument("--depth", type=int, default=DEFAULTS.depth,
                       help="hidden layers of the MLP (default: %(default)s)")
    model.add_argument("--head-depth", type=int, default=DEFAULTS.head_depth, metavar="L",
                       help="linear layers after the ReLU trunk; L > 1 makes a bias-free deep "
                            "linear head whose every layer is dumped (default: %(default)s)")
    model.add_argument("--batch-norm", action="store_true",
                       help="BatchNorm after each hidden layer (mlp, cnn)")
    model.add_argument("--no-bias", dest="bias", action="store_false",
                       help="bias-free trunk and classifier")
    optimization = parser.add_argument_group("optimization")
    optimization.add_argument("--loss", choices=LOSSES, default=DEFAULTS.loss,
                              help="ce: cross-entropy; ls: label smoothing; mse: squared error "
                                   "on one-hot targets (default: %(default)s)")
    optimization.add_argument("--smoothing", type=float, metavar="ALPHA",
                              help=f"label smoothing alpha for --loss ls, in (0, 1) (default "
                                   f"{DEFAULT_SMOOTHING})")
    optimization.add_argument("--epochs", type=int, default=DEFAULTS.epochs,
                              help="training epochs (default: %(default)s)")
    optimization.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                              help="rows per SGD step; 0 trains full-batch "
                                   "(default: %(default)s)")
    optimization.add_argument("--lr", type=float, default=DEFAULTS.lr,
                              help="initial learning rate, cosine-annealed to 0 "
                                   "(default: %(default)s)")
    optimization.add_argument("--momentum", type=float, default=DEFAULTS.momentum,
                              help="SGD momentum (default: %(default)s)")
    optimization.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay,
                              metavar="LAMBDA",
                              help="L2 penalty LAMBDA/2*||theta||^2 on the network "
                                   "(default: %(default)s)")
    optimization.add_argument("--feature-decay", type=float, metavar="LAMBDA_H",
                              help="ufm: penalty on the free features (default: "
                                   "--weight-decay)")
    optimization.add_argument("--feature-lr", type=float, metavar="LR",
                              help="ufm: learning rate of the free features (default: --lr "
                                   "times the training rows)")
    output = parser.add_argument_group("output")
    output.add_argument("--checkpoints", type=int, default=DEFAULTS.checkpoints,
                        help="log-spaced epochs at which features are dumped, the last being "
                             "--epochs (default: %(default)s)")
    output.add_argument("--seed", type=int, default=DEFAULTS.seed,
                        help="seed of data, noise, initialisation and shuffling, in "
                             "[0, 2**32) (default: %(default)s)")


def config_from_args(args):
    """The ``TrainConfig`` of parsed ``ncfast train`` arguments."""
    options = {item.name: getattr(args, item.name) for item in dataclasses.fields(TrainConfig)}
    if options["class_counts"] is not None:
        options["class_counts"] = tuple(options["class_counts"])
    if options["batch_size"] == 0:
        options["batch_size"] = None
    return TrainConfig(**options)


def run_train(args, console, errors):
    """``ncfast train``: validate, train, summarise."""
    from ncfast.harness.training import train

    config = config_from_args(args)
    config.validate()
    result = train(config, args.out, progress=not args.no_progress, threads=args.threads,
                   device=args.device)
    terminal = ("not reached" if result.terminal_epoch is None
                else f"from epoch {result.terminal_epoch}")
    test = "-" if result.test_accuracy is None else f"{result.test_accuracy:.4f}"
    summary = (f"run folder {result.path}: checkpoints at epochs {result.dumped_epochs}; "
               f"train accuracy {result.train_accuracy:.4f} (noisy labels), "
               f"{result.clean_train_accuracy:.4f} (clean); test accuracy {test}; "
               f"terminal phase {terminal}")
    status = print_on_stdout(lambda: write_captured(console, plain_markup(summary)), console,
                             errors, "ncfast train", f"the run is in {result.path}")
    tell(errors, f"ncfast train: measure it with: ncfast analyze {result.path}")
    return status


def run_demo(args, console, errors):
    """``ncfast demo``: train both runs, print the side-by-side table."""
    from rich.table import Table

    from ncfast.harness.demo import demo

    started = time.perf_counter()
    table = demo(args.out, epochs=args.epochs, noise=args.noise, smoothing=args.smoothing,
                 seed=args.seed, progress=not args.no_progress)
    runs = [key for key in table[0] if key != "metric"]
    shown = Table(title=f"ncfast demo: MNIST-1D, {args.noise:.0%} symmetric label noise, "
                        f"last checkpoint (epoch {args.epochs})")
    shown.add_column("")
    for run in runs:
        shown.add_column(run.replace("_", " "), justify="right")
    for row in table:
        shown.add_row(row["metric"], *("-" if row[run] is None else
                                       f"{row[run]:.4g}" for run in runs))
    status = print_on_stdout(lambda: write_captured(console, shown), console, errors,
                             "ncfast demo", f"they are written to {args.out}")
    tell(errors, f"ncfast demo: wrote {args.out}/demo.md, metrics.json, metrics.csv and plots "
                 f"(memorization_vs_dilation.png, METRIC.png) in "
                 f"{time.perf_counter() - started:.0f} s")
    return status


#: Exit status of ``ncfast reproduce`` for each verdict of the claim (2 is argparse's usage
#: error, 1 any other error).
REPRODUCE_EXIT = {"held": 0, "contradicted": 4, "undecided": 3}


def run_reproduce(args, console, errors):
    """``ncfast reproduce NAME``: run one reproduction, print its verdicts."""
    from ncfast.harness.reports import VERDICT_WORDS
    from ncfast.harness.reproduce import REPRODUCTIONS

    out = args.out or f"ncfast-reproduce-{args.name}"
    outcome = REPRODUCTIONS[args.name](out, grid=args.grid, seeds=args.seeds,
                                       workers=args.workers, device=args.device,
                                       progress=not args.no_progress)
    colours = {"held": "green", "contradicted": "red", "undecided": "yellow"}
    lines = [f"[{colours[statement.verdict]}]{statement.verdict.upper()}[/] "
             + plain_markup(f"{statement.key}: {statement.text} ({statement.evidence})")
             for statement in outcome.statements]
    lines.append(plain_markup(f"claim {VERDICT_WORDS[outcome.verdict]}; "
                              f"report: {outcome.report}"))
    status = print_on_stdout(lambda: write_captured(console, *lines), console, errors,
                             "ncfast reproduce", f"the report is {outcome.report}")
    return status or REPRODUCE_EXIT[outcome.verdict]



def add_commands(commands):
    """Add ``train``, ``demo`` and ``reproduce`` to the CLI's subparsers."""
    from ncfast.harness.reproduce import REPRODUCTIONS

    train = commands.add_parser(
        "train", help="train into the terminal phase and dump features",
        description=TRAIN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("out", metavar="RUN_FOLDER",
                       help="run folder to write (or to resume)")
    add_train_options(train)
    train.add_argument("--threads", type=int, default=1,
                       help="torch CPU threads; small models are fastest on one "
                            "(default: %(default)s)")
    train.add_argument("--device", default="cpu",
                       help="torch device: cpu, cuda or cuda:N (default: %(default)s; only "
                            "CPU training is bitwise reproducible)")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.set_defaults(handler=run_train)

    demo = commands.add_parser(
        "demo", help="the main job: cross-entropy vs label smoothing under label noise",
        description=DEMO_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--out", default="ncfast-demo", metavar="DIR",
                      help="folder for the runs, tables and plots (default: ./%(default)s)")
    demo.add_argument("--epochs", type=int, default=DEMO_CONFIG.epochs,
                      help="epochs of each run (default: %(default)s)")
    demo.add_argument("--noise", type=float, default=DEMO_CONFIG.noise, metavar="P",
                      help="symmetric label-noise rate (default: %(default)s)")
    demo.add_argument("--smoothing", type=float, default=DEFAULT_SMOOTHING, metavar="ALPHA",
                      help="label-smoothing alpha of the second run (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    demo.set_defaults(handler=run_demo)

    reproduce = commands.add_parser(
        "reproduce", help="reproduce a claim and write a markdown report",
        description=REPRODUCE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    reproduce.add_argument("name", choices=tuple(REPRODUCTIONS), metavar="NAME",
                           help=f"one of: {', '.join(REPRODUCTIONS)}")
    reproduce.add_argument("--out", metavar="DIR",
                           help="folder for the runs, report and plots; the same folder "
                                "resumes (default: ./ncfast-reproduce-NAME)")
    reproduce.add_argument("--grid", choices=("quick", "full"), default="quick",
                           help="quick: 15 minutes on 2 CPU cores; full: the publication "
                                "grid, for a GPU (default: %(default)s)")
    reproduce.add_argument("--seeds", type=int, metavar="K",
                           help="seeds per setting (default: the grid's, 3 quick, 5 full)")
    reproduce.add_argument("--workers", type=int, metavar="N",
                           help="training processes at once, one torch thread each "
                                "(default: the CPUs available)")
    reproduce.add_argument("--device", default="auto",
                           help="torch device of every run: auto (cuda when torch sees a GPU, "
                                "else cpu), cpu, cuda or cuda:N (default: %(default)s)")
    reproduce.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    reproduce.set_defaults(handler=run_reproduce)
