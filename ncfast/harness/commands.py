"""The ``train``, ``demo`` and ``reproduce`` subcommands of the ``ncfast`` CLI.

Parsing needs no torch; the handlers import it when they train.
"""
import argparse
import dataclasses
import time

from ncfast.harness.datasets import DATASETS
from ncfast.harness.demo import DEMO_CONFIG
from ncfast.harness.losses import DEFAULT_SMOOTHING, LOSSES
from ncfast.harness.noise import NOISE_KINDS
from ncfast.harness.training import MODELS, TrainConfig

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
Reproduce one claim this project rests on and write OUT/report.md (claim, table, verdict,
plots), OUT/metrics.json, OUT/metrics.csv and PNG plots; exits 0 if the claim held, 2 if not.
  memorization-dilation  Nguyen et al. 2023: label noise 0/0.2/0.4, cross-entropy vs label
                         smoothing, 1-D CNN on MNIST-1D (six runs, minutes)
  weight-decay           Rangamani & Banburski: bias-free ReLU MLP with MSE on digits, with
                         and without weight decay (a few minutes)
  imbalanced             Dang et al. 2023: unconstrained features, L=1 and L=3 bias-free linear
                         heads, class counts [200, 100, 50, 50], vs the closed form (seconds)"""


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
                        help="seed of data, noise, initialisation and shuffling "
                             "(default: %(default)s)")


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
    result = train(config, args.out, progress=not args.no_progress, threads=args.threads)
    terminal = ("not reached" if result.terminal_epoch is None
                else f"from epoch {result.terminal_epoch}")
    test = "-" if result.test_accuracy is None else f"{result.test_accuracy:.4f}"
    console.print(f"run folder {result.path}: checkpoints at epochs {result.dumped_epochs}; "
                  f"train accuracy {result.train_accuracy:.4f} (noisy labels), "
                  f"{result.clean_train_accuracy:.4f} (clean); test accuracy {test}; "
                  f"terminal phase {terminal}")
    console.print(f"measure it with: ncfast analyze {result.path}")
    return 0


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
    console.print(shown)
    console.print(f"wrote {args.out}/demo.md, metrics.json, metrics.csv and plots "
                  f"(memorization_vs_dilation.png, METRIC.png) in "
                  f"{time.perf_counter() - started:.0f} s")
    return 0


def run_reproduce(args, console, errors):
    """``ncfast reproduce NAME``: run one reproduction, print its verdict."""
    from ncfast.harness.reproduce import REPRODUCTIONS

    out = args.out or f"ncfast-reproduce-{args.name}"
    outcome = REPRODUCTIONS[args.name](out, progress=not args.no_progress)
    for check, passed in outcome.checks:
        console.print(f"[{'green' if passed else 'red'}]{'PASS' if passed else 'FAIL'}"
                      f"[/] {check}")
    console.print(f"claim {'held' if outcome.held else 'did NOT hold'}; report: "
                  f"{outcome.report}")
    return 0 if outcome.held else 2


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
                           help="folder for the runs, report and plots "
                                "(default: ./ncfast-reproduce-NAME)")
    reproduce.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    reproduce.set_defaults(handler=run_reproduce)
