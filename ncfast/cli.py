"""The ``ncfast`` command line."""
import argparse
import sys

import numpy as np
from rich.console import Console
from rich.table import Table

#: Metrics the synthetic demo tabulates.
DEMO_METRICS = ("nc1", "nc1_trace", "cdnv", "nc2_etf", "nc2_equinorm", "nc3", "nc4",
                "ncc_accuracy", "accuracy")


def synthetic_collapse(spread, *, num_rows, num_features, num_classes, seed=0):
    """Features collapsing onto a simplex ETF, with a matching classifier.

    Rows are ``scale * etf_c + spread * noise``; the classifier is the ETF
    itself perturbed by ``spread``, so NC1–NC4 all fall as ``spread`` falls.

    Returns
    -------
    features : float32 array of shape (num_rows, num_features)
    labels : int64 array of shape (num_rows,)
    weights : float64 array of shape (num_classes, num_features)
    bias : float64 array of shape (num_classes,)
        Cancels the common offset of the features.
    """
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(num_features, num_classes)))
    etf = (np.eye(num_classes) - 1.0 / num_classes) @ basis.T
    offset = 5.0
    labels = rng.integers(0, num_classes, num_rows)
    features = (etf[labels] * 10.0 + spread * rng.normal(size=(num_rows, num_features))
                + offset).astype(np.float32)
    weights = etf + spread * 0.1 * rng.normal(size=etf.shape)
    bias = -offset * weights.sum(axis=1)
    return features, labels, weights, bias


def run_demo(args, console):
    """Analyse a synthetic collapse sweep and print one column per within-class spread."""
    from ncfast.api import collapse

    reports = []
    for spread in args.spreads:
        features, labels, weights, bias = synthetic_collapse(
            spread, num_rows=args.rows, num_features=args.features, num_classes=args.classes)
        reports.append(collapse(features, labels, num_classes=args.classes, weights=weights,
                                bias=bias))
    table = Table(title=f"ncfast: synthetic collapse sweep (N={args.rows:,}, D={args.features}, "
                        f"C={args.classes})")
    table.add_column("metric \\ spread")
    for spread in args.spreads:
        table.add_column(f"{spread:g}", justify="right")
    for name in DEMO_METRICS:
        table.add_row(name, *(f"{getattr(report, name):.3g}" for report in reports))
    console.print(table)
    return 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="ncfast", description="Measure neural collapse of saved or synthetic features.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="analyse a synthetic collapse sweep and print a table",
        description="Analyse features that collapse more and more onto a simplex ETF.")
    demo.add_argument("--rows", type=int, default=200_000, help="feature rows (default 200000)")
    demo.add_argument("--features", type=int, default=256, help="feature dimension D")
    demo.add_argument("--classes", type=int, default=10, help="number of classes C")
    demo.add_argument("--spreads", type=float, nargs="+",
                      default=[3.0, 1.0, 0.3, 0.1, 0.01, 0.001],
                      help="within-class standard deviations to sweep")
    demo.set_defaults(handler=run_demo)
    from ncfast.analyze import add_commands  # analyze, merge

    add_commands(commands)
    return parser


def main(argv=None):
    """Entry point of the ``ncfast`` console script."""
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        return args.handler(args, console)
    except (ValueError, TypeError, OSError) as error:
        console.print(f"[red]ncfast {args.command}: {error}[/red]")
        return 1


if __name__ == "__main__":
    sys.exit(main())
