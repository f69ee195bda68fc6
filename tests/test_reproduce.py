"""Reproductions: the imbalanced closed form, claim 3 end to end, reports, the CLI."""
import subprocess
import sys

import numpy as np
import pytest

from ncfast.harness.reproduce import (CLOSED_FORM_TOLERANCE, REPRODUCTIONS,
                                      imbalanced, imbalanced_closed_form, markdown_table)

COUNTS = (200, 100, 50, 50)


def test_closed_form_for_one_layer_is_dang_et_al_explicit_formula():
    weight_decay, feature_decay = 5e-3, 2e-3
    weight_norms, mean_norms = imbalanced_closed_form(
        COUNTS, head_depth=1, weight_decay=weight_decay, feature_decay=feature_decay)
    counts, num_rows = np.array(COUNTS, dtype=float), sum(COUNTS)
    s_squared = np.sqrt(counts * feature_decay / weight_decay) - num_rows * feature_decay
    np.testing.assert_allclose(weight_norms ** 2, s_squared, rtol=1e-9)
    np.testing.assert_allclose(mean_norms ** 2,
                               s_squared / (s_squared + num_rows * feature_decay) ** 2,
                               rtol=1e-9)


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_closed_form_roots_solve_the_defining_equation(depth):
    decay, num_rows = 5e-3, sum(COUNTS)
    weight_norms, _ = imbalanced_closed_form(COUNTS, head_depth=depth, weight_decay=decay,
                                             feature_decay=decay)
    roots = (weight_norms ** 2 / (num_rows * decay)) ** (1.0 / depth)  # s^2L = N lH x^L
    b = depth * num_rows * (num_rows * decay ** depth * decay) ** (1.0 / depth)
    np.testing.assert_allclose(b / np.array(COUNTS),
                               depth * roots ** (depth - 1) / (roots ** depth + 1) ** 2,
                               rtol=1e-7)
    # the largest root: past it the right-hand side only falls
    assert np.all(depth * (roots * 1.01) ** (depth - 1) / ((roots * 1.01) ** depth + 1) ** 2
                  < b / np.array(COUNTS))


def test_minority_classes_without_a_root_collapse_to_zero():
    weight_norms, mean_norms = imbalanced_closed_form(
        (1000, 10), head_depth=1, weight_decay=0.01, feature_decay=0.01)
    assert weight_norms[0] > 0 and weight_norms[1] == 0 and mean_norms[1] == 0


def test_claim_3_unconstrained_features_match_the_closed_form(tmp_path):
    outcome = imbalanced(str(tmp_path), progress=False)
    assert outcome.held, outcome.checks
    assert len(outcome.table) == 2 * len(COUNTS)
    for row in outcome.table:
        assert row["error w"] <= CLOSED_FORM_TOLERANCE and row["error mu"] <= \
            CLOSED_FORM_TOLERANCE, row
    report = (tmp_path / "report.md").read_text()
    assert "the claim held" in report and "| L | class | n_c |" in report
    for plot in ("nc2_orthogonality.png", "nc1.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_table_formats_floats_and_missing_values():
    table = markdown_table([{"run": "a", "x": 0.123456, "y": None}, {"run": "b", "x": 2.0,
                                                                      "y": 3}])
    assert table.splitlines() == ["| run | x | y |", "|---|---|---|", "| a | 0.1235 | - |",
                                  "| b | 2 | 3 |"]


def test_reproduce_cli_lists_the_reproductions_and_refuses_others():
    done = subprocess.run([sys.executable, "-m", "ncfast", "reproduce", "nonsense"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "invalid choice: 'nonsense'" in done.stderr
    for name in REPRODUCTIONS:
        assert name in done.stderr


@pytest.mark.parametrize("changes", [
    {}, {"batch_norm": True, "loss": "ls", "smoothing": 0.2, "noise": 0.3, "noise_kind": "pair"},
    {"dataset": "gaussian", "class_counts": (5, 3), "model": "ufm", "head_depth": 3,
     "bias": False, "loss": "mse", "batch_size": None, "feature_decay": 0.01},
])
def test_report_train_commands_rebuild_the_same_config(changes):
    from ncfast.cli import build_parser
    from ncfast.harness import TrainConfig
    from ncfast.harness.commands import config_from_args
    from ncfast.harness.reproduce import train_command

    config = TrainConfig(**changes)
    words = train_command(config, "runs/x").split()
    assert words[:3] == ["ncfast", "train", "runs/x"]
    assert config_from_args(build_parser().parse_args(words[1:])) == config
