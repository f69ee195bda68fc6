"""``ncfast demo``: the main job.

Trains the same 1-D CNN on MNIST-1D with 20% symmetric label noise twice —
with cross-entropy and with label smoothing — into the terminal phase,
measures every dumped checkpoint of both runs, prints a side-by-side table
and writes plots (each metric against epoch for both runs, memorization vs
dilation).
"""
import dataclasses
import os

from ncfast.dumps import write_text_atomically
from ncfast.harness.grid import final_row, published, train_and_analyze
from ncfast.harness.reports import markdown_table
from ncfast.harness.training import TrainConfig

#: Rows of the demo's table: (label, split, metric key of an analysis row).
DEMO_ROWS = (
    ("test accuracy", "test", "accuracy"),
    ("train accuracy, noisy labels", "train", "accuracy"),
    ("noise fit (corrupted rows fitted)", "train", "noise_fit"),
    ("nc1 (train)", "train", "nc1"),
    ("nc1 of clean rows", "train", "nc1_clean"),
    ("nc2_etf", "train", "nc2_etf"),
    ("nc3", "train", "nc3"),
    ("nc4", "train", "nc4"),
    ("memorization", "train", "memorization"),
    ("dilation", "train", "dilation"),
    ("test NCC accuracy (train means)", "test", "ncc_accuracy"),
)

#: The demo's run: MNIST-1D (5000 samples, 4000 for training), 20% symmetric noise, the
#: 1-D CNN, into the terminal phase.
DEMO_CONFIG = TrainConfig(dataset="mnist1d", model="cnn", noise=0.2, epochs=300, checkpoints=12)


def demo_configs(*, epochs=DEMO_CONFIG.epochs, noise=DEMO_CONFIG.noise, smoothing=0.1,
                 seed=DEMO_CONFIG.seed):
    """The two runs of the demo: ``{"cross_entropy": ..., "label_smoothing": ...}``."""
    base = dataclasses.replace(DEMO_CONFIG, epochs=epochs, noise=noise, seed=seed)
    return {"cross_entropy": base,
            "label_smoothing": dataclasses.replace(base, loss="ls", smoothing=smoothing)}


def demo(out, *, epochs=DEMO_CONFIG.epochs, noise=DEMO_CONFIG.noise, smoothing=0.1,
         seed=DEMO_CONFIG.seed, progress=True):
    """Train, measure and compare cross-entropy and label smoothing under label noise.

    Parameters
    ----------
    out : str
        Folder for both run folders, ``metrics.json``, ``metrics.csv``, the
        PNG plots and ``demo.md``.
    epochs : int
    noise : float
        Symmetric label-noise rate.
    smoothing : float
        Label-smoothing alpha of the second run.
    seed : int
    progress : bool

    Returns
    -------
    table : list of dict
        One dict per row of ``DEMO_ROWS`` (keys ``metric`` and one per run),
        plus the epoch at which each run reached zero training error.
    """
    from ncfast.analyze import scalar_metrics
    from ncfast.plots import write_plots

    configs = demo_configs(epochs=epochs, noise=noise, smoothing=smoothing, seed=seed)
    results, rows = train_and_analyze(configs, out, progress=progress)
    table = []
    for label, split, key in DEMO_ROWS:
        table.append({"metric": label, **{name: final_row(rows, name, split=split).get(key)
                                           for name in configs}})
    table.append({"metric": "terminal phase from epoch",
                  **{name: result.terminal_epoch for name, result in results.items()}})
    with published(out, rows) as staging:
        write_plots(rows, staging, scalar_metrics(rows))
        write_text_atomically(os.path.join(staging, "demo.md"),
                              f"# ncfast demo: MNIST-1D, {noise:.0%} symmetric label noise, "
                              f"cross-entropy vs label smoothing (alpha {smoothing:g})\n\n"
                              f"{markdown_table(table)}\n")
    return table
