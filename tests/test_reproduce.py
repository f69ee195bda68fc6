"""Reproductions: the grids they run, tiny end-to-end grids, the closed form, reports, CLI."""
import dataclasses
import json
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from ncfast.harness import TrainConfig
from ncfast.harness import imbalanced as claim_imbalanced
from ncfast.harness import memorization, weight_decay
from ncfast.harness.grid import GridRun, seeded_runs
from ncfast.harness.imbalanced import imbalanced_closed_form
from ncfast.harness.reports import markdown_table, train_command
from ncfast.harness.reproduce import GRIDS, REPRODUCTIONS
from ncfast.harness.verdicts import CONTRADICTED, HELD, UNDECIDED, Spread, combine, compare

COUNTS = (200, 100, 50, 50)
VERDICTS = (HELD, CONTRADICTED, UNDECIDED)
PNG = b"\x89PNG\r\n\x1a\n"


# --- the grids ---------------------------------------------------------------------------

def test_every_reproduction_has_a_quick_and_a_full_grid_of_valid_runs():
    assert set(GRIDS) == set(REPRODUCTIONS)
    for name, grids in GRIDS.items():
        assert set(grids) == {"quick", "full"}, name
        for size, spec in grids.items():
            assert spec.seeds >= (3 if size == "quick" else 5), (name, size)
            assert spec.scope, (name, size)
    for spec in memorization.GRIDS.values():
        for config in memorization.settings(spec).values():
            config.validate()
    for spec in weight_decay.GRIDS.values():
        for config in weight_decay.settings(spec).values():
            config.validate()


def test_memorization_grids_span_the_papers_noise_and_smoothing():
    for spec in memorization.GRIDS.values():
        assert {("symmetric", 0.0), ("symmetric", 0.2), ("symmetric", 0.4)} <= set(spec.noises)
        assert 0.0 in spec.smoothings and max(spec.smoothings) >= 0.5
    assert any(kind == "pair" for kind, _ in memorization.FULL.noises)
    settings = memorization.settings(memorization.QUICK)
    assert settings["symmetric0.4_alpha0"].loss == "ce"
    assert settings["symmetric0.4_alpha0.3"] == dataclasses.replace(
        memorization.QUICK.base, loss="ls", smoothing=0.3, noise=0.4)


def test_weight_decay_grids_are_the_papers_setting():
    for spec in weight_decay.GRIDS.values():
        assert 0.0 in spec.decays and len(spec.decays) >= 3
        assert {config.dataset for config in spec.datasets} == {"digits", "mnist1d"}
        for config in spec.datasets:
            assert (config.model, config.loss, config.bias, config.batch_norm,
                    config.balanced) == ("mlp", "mse", False, False, True)


#: Input length of each dataset the weight-decay grids train on.
INPUT_LENGTHS = {"digits": 64, "mnist1d": 40}


@pytest.mark.parametrize("config", [*weight_decay.QUICK.datasets,
                                    *weight_decay.FULL.datasets])
def test_weight_decay_network_is_positively_homogeneous(config):
    torch = pytest.importorskip("torch")
    from ncfast.harness.models import build_model

    torch.manual_seed(0)
    length = INPUT_LENGTHS[config.dataset]
    model = build_model(config.model, input_shape=(length,), num_classes=10, num_train=50,
                        width=config.width, depth=config.depth, batch_norm=config.batch_norm,
                        bias=config.bias).double()
    assert not [name for name, _ in model.named_parameters() if "bias" in name]
    assert not [module for module in model.modules()
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]
    inputs = torch.rand(50, length, dtype=torch.float64)
    with torch.no_grad():
        logits = model(inputs)
        for parameter in model.parameters():
            parameter.mul_(1.5)
        scaled = model(inputs)
    layers = config.depth + 1  # f(c θ) = c^L f(θ) for L linear layers
    torch.testing.assert_close(scaled, 1.5 ** layers * logits, rtol=1e-10, atol=1e-12)


# --- tiny end-to-end grids ---------------------------------------------------------------

#: Every run reaches the terminal phase (zero error on its noisy labels) at epoch 60.
TINY_NOISE = memorization.MemorizationGrid(
    base=TrainConfig(dataset="gaussian", num_samples=150, num_features=32, num_classes=3,
                     width=64, depth=2, epochs=60, batch_size=32, lr=0.1, checkpoints=2),
    noises=(("symmetric", 0.0), ("symmetric", 0.4), ("pair", 0.4)), smoothings=(0.0, 0.3),
    seeds=2, scope="A test grid.")


def _final_train_rows(out):
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    last = {}
    for row in rows:
        if row["split"] == "train" and row["layer"] == "penultimate":
            name = row["source"].rstrip("/").rsplit("/", 1)[-1]
            if row["epoch"] >= last.get(name, {"epoch": -1})["epoch"]:
                last[name] = row
    return last


def test_memorization_reproduction_decides_each_statement_from_its_table(tmp_path, monkeypatch):
    outcome = memorization.memorization_dilation(str(tmp_path), grid=TINY_NOISE, workers=1,
                                                 progress=False)
    assert [statement.key for statement in outcome.statements] == ["M1", "M2", "M3", "M4"]
    assert all(statement.verdict in VERDICTS for statement in outcome.statements)
    assert outcome.verdict == combine(statement.verdict for statement in outcome.statements)
    assert len(outcome.tables["settings"]) == 6 and len(outcome.tables["comparisons"]) == 2
    assert [row["noisy runs"] for row in outcome.tables["lines"]] == [4, 4]
    assert all(row["in terminal phase"] == "2/2" for row in outcome.tables["settings"])
    for key, column in (("M2", "M2 memorization LS − CE"), ("M3", "M3 dilation LS − CE"),
                        ("M4", "M4 test acc LS − CE")):
        cells = [row[column].rsplit(": ", 1)[1] for row in outcome.tables["comparisons"]]
        assert all(row["counted"] == "yes" for row in outcome.tables["comparisons"])
        assert next(statement.verdict for statement in outcome.statements
                    if statement.key == key) == combine(cells)

    # The table's spreads are those of the measured rows, recomputed here.
    last = _final_train_rows(tmp_path)
    plain, smooth = (Spread.of(last[f"symmetric0.4_alpha{alpha}_seed{seed}"]["memorization"]
                               for seed in (0, 1)) for alpha in ("0", "0.3"))
    row = next(row for row in outcome.tables["settings"]
               if row["noise"] == "symmetric 40%" and row["α"] == 0.3)
    assert row["memorization"] == str(smooth)
    assert outcome.tables["comparisons"][0]["M2 memorization LS − CE"] == str(
        compare(smooth, plain, claimed="lower"))

    report = (tmp_path / "report.md").read_text()
    for text in ("## Verdicts", "What this grid can and cannot decide", "A test grid.",
                 "**Comparison rule.**", "## Runtime", "symmetric0.4_alpha0.3_seed1",
                 "--noise 0.4 --noise-kind pair", "--seed 1", "Load average"):
        assert text in report, text
    for plot in ("memorization_vs_dilation.png", "test_accuracy_vs_alpha.png",
                 "memorization_vs_alpha.png", "dilation_vs_alpha.png"):
        assert (tmp_path / plot).read_bytes()[:8] == PNG
        assert f"]({plot})" in report

    from ncfast.harness import training

    monkeypatch.setattr(training, "_train_epoch", None)  # a rerun trains nothing
    again = memorization.memorization_dilation(str(tmp_path), grid=TINY_NOISE, workers=1,
                                               progress=False)
    assert again.tables == outcome.tables
    assert "read back finished from an earlier command: 12" in \
        (tmp_path / "report.md").read_text()


def test_runs_short_of_the_terminal_phase_are_shown_but_not_counted(tmp_path):
    short = dataclasses.replace(TINY_NOISE, base=dataclasses.replace(TINY_NOISE.base, epochs=2))
    outcome = memorization.memorization_dilation(str(tmp_path), grid=short, workers=1,
                                                 progress=False)
    assert all(row["counted"] == "no" for row in outcome.tables["comparisons"])
    assert outcome.tables["lines"] == []
    for statement in outcome.statements:
        assert statement.verdict == UNDECIDED
    assert "not counted (a seed short of the terminal phase): symmetric 40% α=0.3, pair 40% " \
        "α=0.3" in outcome.statements[1].evidence


#: Zero training error by epoch 12 of 40 in every run.
TINY_DECAY = weight_decay.WeightDecayGrid(
    datasets=(weight_decay.homogeneous_config("gaussian", width=64, depth=2, epochs=40,
                                              checkpoints=4, num_samples=160, num_features=32,
                                              num_classes=4),),
    decays=(0.0, 1e-3), seeds=2, scope="A test grid.")


def test_weight_decay_reproduction_compares_against_no_weight_decay(tmp_path):
    outcome = weight_decay.weight_decay(str(tmp_path), grid=TINY_DECAY, workers=1,
                                        progress=False)
    assert [statement.key for statement in outcome.statements] == ["W1 gaussian",
                                                                    "W2 gaussian"]
    assert len(outcome.tables["falls"]) == 2 and len(outcome.tables["lowers"]) == 1
    assert [row["counted"] for row in outcome.tables["falls"]] == ["no", "yes"]  # λ = 0: shown
    assert outcome.tables["lowers"][0]["counted"] == "yes"
    assert "not counted" not in outcome.statements[0].evidence
    last = _final_train_rows(tmp_path)
    for metric in weight_decay.METRICS:
        with_decay = Spread.of(last[f"gaussian_wd0.001_seed{seed}"][metric] for seed in (0, 1))
        without = Spread.of(last[f"gaussian_wd0_seed{seed}"][metric] for seed in (0, 1))
        expected = "both 0" if weight_decay._both_zero(with_decay, without) else \
            str(compare(with_decay, without, claimed="lower"))
        assert outcome.tables["lowers"][0][metric] == expected
    report = (tmp_path / "report.md").read_text()
    assert "--balanced" in report and "--no-bias" in report and "--loss mse" in report
    for plot in ("nc_vs_epoch_gaussian.png", "final_vs_weight_decay.png"):
        assert (tmp_path / plot).read_bytes()[:8] == PNG


def test_weight_decays_short_of_the_terminal_phase_are_not_counted(tmp_path):
    short = dataclasses.replace(TINY_DECAY, datasets=(
        dataclasses.replace(TINY_DECAY.datasets[0], epochs=3),))
    outcome = weight_decay.weight_decay(str(tmp_path), grid=short, workers=1, progress=False)
    assert outcome.tables["lowers"][0]["counted"] == "no"
    for statement in outcome.statements:
        assert statement.verdict == UNDECIDED
        assert statement.evidence.endswith("outside the claim's setting (not every seed past "
                                           "zero training error by 50% of its epochs): λ = 0, "
                                           "0.001")
    assert "It held in full in none of the 1 settings" in (tmp_path / "report.md").read_text()


def test_metrics_at_zero_in_every_seed_are_not_compared():
    zeros = Spread.of([0.0, 0.0])
    assert weight_decay._compared(zeros, zeros) is None
    assert weight_decay._compared(zeros, Spread.of([0.1, 0.1])).verdict == HELD


# --- claim 3: the closed form ------------------------------------------------------------

def test_closed_form_for_one_layer_is_dang_et_al_explicit_formula():
    weight_decay_, feature_decay = 5e-3, 2e-3
    weight_norms, mean_norms = imbalanced_closed_form(
        COUNTS, head_depth=1, weight_decay=weight_decay_, feature_decay=feature_decay)
    counts, num_rows = np.array(COUNTS, dtype=float), sum(COUNTS)
    s_squared = np.sqrt(counts * feature_decay / weight_decay_) - num_rows * feature_decay
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


def test_head_read_from_the_training_state_is_the_trained_models(tmp_path):
    pytest.importorskip("torch")
    from ncfast.harness import train

    config = claim_imbalanced.imbalanced_config(3, epochs=5)
    result = train(config, tmp_path / "run", progress=False)
    np.testing.assert_array_equal(claim_imbalanced.trained_head(str(tmp_path / "run"), config),
                                  result.model.end_to_end_weights().detach().numpy())


def test_claim_3_unconstrained_features_match_the_closed_form(tmp_path):
    spec = dataclasses.replace(claim_imbalanced.QUICK, depths=(1,), seeds=2)
    outcome = claim_imbalanced.imbalanced(str(tmp_path), grid=spec, workers=1, progress=False)
    assert outcome.held, outcome.statements
    assert len(outcome.tables["classes"]) == len(COUNTS)
    report = (tmp_path / "report.md").read_text()
    assert "the claim held" in report and "| L | class | n_c |" in report
    for plot in ("weight_norms.png", "mean_norms.png"):
        assert (tmp_path / plot).read_bytes()[:8] == PNG


# --- reports and the command line --------------------------------------------------------

def test_markdown_table_formats_floats_and_missing_values():
    table = markdown_table([{"run": "a", "x": 0.123456, "y": None}, {"run": "b", "x": 2.0,
                                                                      "y": 3}])
    assert table.splitlines() == ["| run | x | y |", "|---|---|---|", "| a | 0.1235 | - |",
                                  "| b | 2 | 3 |"]
    assert markdown_table([]) == "(none)"


@pytest.mark.parametrize("changes", [
    {}, {"batch_norm": True, "loss": "ls", "smoothing": 0.2, "noise": 0.3, "noise_kind": "pair"},
    {"dataset": "gaussian", "class_counts": (5, 3), "model": "ufm", "head_depth": 3,
     "bias": False, "loss": "mse", "batch_size": None, "feature_decay": 0.01},
    {"dataset": "digits", "balanced": True, "bias": False, "loss": "mse", "weight_decay": 0.0},
])
def test_report_train_commands_rebuild_the_same_config(changes):
    from ncfast.cli import build_parser
    from ncfast.harness.commands import config_from_args

    config = TrainConfig(**changes)
    words = train_command(config, "runs/x").split()
    assert words[:3] == ["ncfast", "train", "runs/x"]
    assert config_from_args(build_parser().parse_args(words[1:])) == config
    on_gpu = train_command(config, "runs/x", device="cuda").split()
    assert on_gpu[-2:] == ["--device", "cuda"]
    assert build_parser().parse_args(on_gpu[1:]).device == "cuda"


def test_reproduce_cli_lists_the_reproductions_and_refuses_others():
    done = subprocess.run([sys.executable, "-m", "ncfast", "reproduce", "nonsense"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "invalid choice: 'nonsense'" in done.stderr
    for name in REPRODUCTIONS:
        assert name in done.stderr


def test_reproduce_cli_refuses_a_bad_seed_count_before_training(tmp_path):
    done = subprocess.run([sys.executable, "-m", "ncfast", "reproduce", "imbalanced",
                           "--seeds", "0", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert "seeds must be a positive int" in done.stdout + done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("verdict, status", [(HELD, 0), (CONTRADICTED, 4), (UNDECIDED, 3)])
def test_reproduce_cli_passes_its_options_and_exits_by_the_verdict(monkeypatch, capsys,
                                                                   verdict, status):
    from ncfast.cli import main
    from ncfast.harness import reproduce
    from ncfast.harness.reports import Reproduction, Statement

    calls = []

    def fake(out, **options):
        calls.append((out, options))
        statement = Statement("X1", "a statement", verdict, "the evidence")
        return Reproduction("imbalanced", "a claim", verdict, [statement], f"{out}/report.md",
                            {})

    monkeypatch.setitem(reproduce.REPRODUCTIONS, "imbalanced", fake)
    assert main(["reproduce", "imbalanced", "--grid", "full", "--seeds", "4", "--workers", "3",
                 "--device", "cpu", "--out", "somewhere", "--no-progress"]) == status
    assert calls == [("somewhere", {"grid": "full", "seeds": 4, "workers": 3, "device": "cpu",
                                    "progress": False})]
    printed = capsys.readouterr().out
    assert f"{verdict.upper()} X1: a statement (the evidence)" in printed
    assert "somewhere/report.md" in printed


def test_spread_strings_in_reports_show_mean_and_std():
    assert str(Spread.of([0.5, 0.7])) == f"0.6 ± {math.sqrt(0.02):.2g}"


def _report_of_undecided(tmp_path, seeds, grid, scope="A test grid.", terminal_epoch=3):
    from ncfast.harness.grid import GridRun, GridTiming, RunRecord
    from ncfast.harness.reports import Statement, reproduce_command, write_report

    records = {}
    for setting in ("a", "b"):
        for seed in range(seeds):
            run = GridRun(setting, seed, dataclasses.replace(TrainConfig(), seed=seed))
            records[run.name] = RunRecord(run, str(tmp_path / "runs" / run.name), 1.0, 1.0, 0.5,
                                          terminal_epoch, 1.0, 1.0, "cpu", True)
    timing = GridTiming(1.0, len(records), 0, 1, "cpu", 2, (0.0,) * 3, (0.0,) * 3)
    statement = Statement("X1", "a is lower than b", UNDECIDED,
                          "cells: 0 held, 0 contradicted, 1 undecided of 1")
    path = write_report(str(tmp_path), title="T", claim="a claim",
                        command=reproduce_command("imbalanced", grid=grid, seeds=seeds,
                                                  workers=1, device="cpu", out=str(tmp_path)),
                        verdict="undecided.", statements=[statement], scope=scope,
                        grid_lines=[], sections=[], plots=[], records=records,
                        run_values={name: {} for name in records}, timing=timing,
                        measure_seconds=0.0)
    return open(path).read()


@pytest.mark.parametrize("seeds, resolution", [(2, "2.0"), (5, "1.3")])
def test_a_grids_scope_states_the_seeds_it_was_run_with(tmp_path, seeds, resolution):
    """`--seeds 5` on the quick imbalanced grid wrote "3 seeds" in the scope beside a grid of
    5 seeds per depth."""
    text = _report_of_undecided(tmp_path, seeds, "quick", scope=claim_imbalanced.QUICK.scope
                                + " A difference must exceed {resolution:.1f} std.")
    assert f"one weight decay (5e-3 on the head and the features), {seeds} seeds." in text
    assert f"A difference must exceed {resolution} std." in text
    for grids in GRIDS.values():  # every grid's scope is a template of these two names only
        for spec in grids.values():
            assert "{" not in spec.scope.format(seeds=3, resolution=1.6)


def test_report_says_why_a_statement_is_undecided(tmp_path):
    # One seed a setting: no standard error at all, so not "within two standard errors".
    text = _report_of_undecided(tmp_path, 1, "quick")
    assert "could not decide X1: with 1 seed in a setting no two settings can be compared" in \
        text
    assert "within two standard errors" not in text.split("**Comparison rule.**")[0]
    # More seeds: within two standard errors or not counted; the full grid is suggested only
    # when this was not it.
    text = _report_of_undecided(tmp_path, 2, "quick")
    assert "within two standard errors, or not counted" in text
    assert "more seeds or the full grid (`--grid full`) may decide them." in text
    text = _report_of_undecided(tmp_path, 2, "full")
    assert "`--grid full`) may decide" not in text and "more seeds may decide them." in text
    # No run in the terminal phase: more seeds would not help (a tiny grid of 30 epochs).
    text = _report_of_undecided(tmp_path, 2, "quick", terminal_epoch=None)
    assert "none of the 4 runs reached the terminal phase" in text
    assert "longer training, not more seeds, may decide them." in text


SEEDS = 3


def _fake_grid(monkeypatch, module, values):
    """Make ``module``'s reproduction read ``values(run) -> (record fields, rows)`` instead of
    training and measuring; no figures, no report file."""
    def run_and_measure(settings, seeds, out, **_):
        runs = seeded_runs(settings, seeds)
        records, rows = {}, []
        for run in runs:
            fields, run_rows = values(run)
            records[run.name] = SimpleNamespace(path=out, run=run, **fields)
            rows += [{"run": run.name, "split": "train", "layer": "penultimate", **row}
                     for row in run_rows]
        return runs, records, SimpleNamespace(workers=1, device="cpu"), rows, 0.0

    monkeypatch.setattr(module, "run_and_measure", run_and_measure)
    monkeypatch.setattr(module, "_figures", lambda *args: [], raising=False)
    monkeypatch.setattr(module, "write_report", lambda out, **kwargs: "report.md")


def _memorization(run, *, ce_terminal=True):
    smooth = (run.config.smoothing or 0.0) > 0
    jitter = 0.01 * run.seed
    terminal = 60 if smooth or ce_terminal or run.seed else None
    fields = dict(test_accuracy=(0.9 if smooth else 0.7) + jitter, train_accuracy=1.0,
                  terminal_epoch=terminal)
    row = {"epoch": 60, "memorization": (0.2 if smooth else 0.5) + jitter + run.config.noise,
           "dilation": (0.3 if smooth else 0.6) + jitter + run.config.noise}
    return fields, [row]


def test_label_smoothing_testing_better_holds_m4(tmp_path, monkeypatch):
    _fake_grid(monkeypatch, memorization, _memorization)
    outcome = memorization.memorization_dilation(str(tmp_path), grid=TINY_NOISE, seeds=SEEDS)
    verdicts = {statement.key: statement.verdict for statement in outcome.statements}
    assert verdicts["M2"] == verdicts["M3"] == verdicts["M4"] == HELD


def test_a_cross_entropy_seed_short_of_the_terminal_phase_is_not_counted(tmp_path,
                                                                        monkeypatch):
    _fake_grid(monkeypatch, memorization,
               lambda run: _memorization(run, ce_terminal=False))
    outcome = memorization.memorization_dilation(str(tmp_path), grid=TINY_NOISE, seeds=SEEDS)
    assert [row["counted"] for row in outcome.tables["comparisons"]] == ["no", "no"]


def _decay(run, *, terminal=20, plain_terminal=True):
    """NC metrics that fall from epoch 10 to 40 with weight decay, stay up without."""
    decayed, jitter = run.config.weight_decay > 0, 0.01 * run.seed
    fields = dict(test_accuracy=0.9, train_accuracy=1.0,
                  terminal_epoch=terminal if decayed or plain_terminal else None)
    rows = [{"epoch": epoch, **{metric: (1.0 if epoch < 40 or not decayed else 0.1) + jitter
                                for metric in weight_decay.METRICS}}
            for epoch in (10, 20, 40)]
    return fields, rows


def test_weight_decay_fall_is_held_when_last_is_lower_than_at_terminal(tmp_path, monkeypatch):
    """Terminal at epoch 20 of 40 = exactly TERMINAL_BY of the epochs: in the claim's setting."""
    _fake_grid(monkeypatch, weight_decay, _decay)
    outcome = weight_decay.weight_decay(str(tmp_path), grid=TINY_DECAY, seeds=SEEDS)
    assert [row["counted"] for row in outcome.tables["falls"]] == ["no", "yes"]
    assert outcome.tables["lowers"][0]["counted"] == "yes"
    assert [statement.verdict for statement in outcome.statements] == [HELD, HELD]


def test_weight_decay_without_a_terminal_baseline_is_not_compared(tmp_path, monkeypatch):
    _fake_grid(monkeypatch, weight_decay,
               lambda run: _decay(run, terminal=10, plain_terminal=False))
    outcome = weight_decay.weight_decay(str(tmp_path), grid=TINY_DECAY, seeds=SEEDS)
    assert outcome.tables["falls"][1]["counted"] == "yes"
    assert outcome.tables["lowers"][0]["counted"] == "no"


def test_a_finished_run_of_another_config_is_not_read_back(tmp_path):
    from ncfast.harness import grid
    from test_grid import TINY

    run = seeded_runs({"a": TINY}, 1)[0]
    grid.run_grid([run], str(tmp_path), workers=1, progress=False)
    changed = GridRun(run.setting, run.seed, dataclasses.replace(run.config, lr=0.3))
    with pytest.raises(ValueError, match="different config"):
        grid.run_grid([changed], str(tmp_path), workers=1, progress=False)



@pytest.mark.parametrize("orthogonality, verdict", [(0.005, HELD), (0.02, CONTRADICTED)])
def test_imbalanced_orthogonality_is_checked_against_its_tolerance(tmp_path, monkeypatch,
                                                                  orthogonality, verdict):
    """nc2_orthogonality of 0.02 (above ORTHOGONALITY_TOLERANCE = 0.01) never holds."""
    import ncfast.harness.figures
    import ncfast.plots

    spec = dataclasses.replace(claim_imbalanced.GRIDS["quick"], depths=(1,))
    _fake_grid(monkeypatch, claim_imbalanced, lambda run: ({}, []))
    monkeypatch.setattr(ncfast.harness.figures, "predicted_figure", lambda *a, **k: None)
    monkeypatch.setattr(ncfast.plots, "save_figure", lambda *a, **k: None)

    def measure(path, config):
        seed = config.seed
        table = [{"norm w_c": 1.0, "predicted w_c": 1.0, "error w": 0.01 + 0.001 * seed,
                  "norm mu_c": 1.0, "predicted mu_c": 1.0, "error mu": 0.01}
                 for _ in config.class_counts]
        return SimpleNamespace(nc2_orthogonality=orthogonality + 1e-4 * seed), table

    monkeypatch.setattr(claim_imbalanced, "measure_imbalanced", measure)
    outcome = claim_imbalanced.imbalanced(str(tmp_path), grid=spec, seeds=SEEDS)
    assert [statement.verdict for statement in outcome.statements] == [verdict]


# --- figures -----------------------------------------------------------------------------

def _drawn(figure):
    """``figure`` drawn on an Agg canvas, so that its layout is done and its texts placed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure).draw()
    return figure


def _spreads(means):
    return [(decay, Spread(mean, 0.1 * mean, 3)) for decay, mean in zip((0.0, 1e-4, 3e-4, 1e-3),
                                                                        means)]


def test_metric_panels_keep_every_y_label_inside_the_figure():
    """The quick grid's last NC1 values: log tick labels as wide as "3×10⁻²"."""
    from ncfast.harness.figures import parameter_figure

    series = {name: {"nc1": _spreads(nc1), "nc3": _spreads([0.45, 0.24, 0.13, 0.11])}
              for name, nc1 in (("digits", [0.0045, 0.0019, 0.0023, 0.008]),
                                ("mnist1d", [0.026, 0.0084, 0.0028, 0.0027]))}
    figure = _drawn(parameter_figure(series, ["nc1", "nc3"], xlabel="λ", title="last epoch"))
    inside = figure.bbox
    for axes in figure.axes[:2]:
        label = axes.yaxis.label.get_window_extent()
        assert label.x0 >= inside.x0 and label.x1 <= inside.x1, axes.get_ylabel()


def test_symlog_value_axis_keeps_zero_and_decade_tick_labels_apart():
    """NC4 of digits: 1 row of 1,320 (7.6e-4) is its smallest value above 0."""
    from ncfast.harness.figures import collapse_curves_figure

    epochs = np.array([1.0, 2, 4, 8, 16, 32, 64, 128, 256, 600])
    seeds = np.array([[0.3, 0.1, 0.02, 0.005, 1 / 1320, 0, 0, 0, 0, 0],
                      [0.25, 0.08, 0.01, 0.003, 0.0015, 0, 0, 0, 0, 0]])
    figure = _drawn(collapse_curves_figure({"λ = 0": (epochs, {"nc4": seeds})}, ["nc4"],
                                           title="nc4"))
    axes = figure.axes[0]
    assert axes.get_yscale() == "symlog"
    low, high = axes.get_ylim()
    labels = [label.get_window_extent() for label in axes.get_yticklabels()
              if label.get_text() and low <= label.get_position()[1] <= high]
    assert len(labels) >= 3
    for index, label in enumerate(labels):
        for other in labels[index + 1:]:
            assert not label.overlaps(other)


def test_series_legend_is_outside_the_data_area():
    """Test accuracy per noise rate: the no-noise error bars reach the top of the axes."""
    from ncfast.harness.figures import series_figure

    series = {noise: [(alpha, Spread(mean + 0.01 * alpha, 0.035, 3))
                      for alpha in (0.0, 0.1, 0.3, 0.5)]
              for noise, mean in (("no noise", 0.57), ("symmetric 20%", 0.45),
                                  ("symmetric 40%", 0.32))}
    figure = _drawn(series_figure(series, xlabel="α", ylabel="test accuracy", title="t"))
    (axes,) = figure.axes
    legend = axes.get_legend().get_window_extent()
    assert not legend.overlaps(axes.get_window_extent())
    assert figure.bbox.x0 <= legend.x0 and legend.x1 <= figure.bbox.x1
    assert [text.get_text() for text in axes.get_legend().get_texts()] == list(series)


def test_predicted_figure_names_every_point_and_coinciding_points_together():
    from ncfast.harness.figures import predicted_figure

    points = {"‖w_c‖, L = 1": [(3.5, Spread(3.48, 1e-4, 3), "class 0 (n_c = 200)"),
                               (2.25, Spread(2.229, 1e-3, 3), "class 2 (n_c = 50)"),
                               (2.25, Spread(2.228, 1e-3, 3), "class 3 (n_c = 50)")]}
    (axes,) = predicted_figure(points, title="norms").axes
    assert [text.get_text() for text in axes.texts] == [
        "class 0 (n_c = 200)", "class 2 (n_c = 50)\nclass 3 (n_c = 50)"]


def test_imbalanced_figures_name_each_point_by_class_and_count(tmp_path, monkeypatch):
    import ncfast.harness.figures
    import ncfast.plots

    spec = dataclasses.replace(claim_imbalanced.GRIDS["quick"], depths=(1,))
    _fake_grid(monkeypatch, claim_imbalanced, lambda run: ({}, []))
    drawn = []
    monkeypatch.setattr(ncfast.harness.figures, "predicted_figure",
                        lambda points, **_: drawn.append(points))
    monkeypatch.setattr(ncfast.plots, "save_figure", lambda *a, **k: None)
    table = [{"norm w_c": 1.0, "predicted w_c": 1.0, "error w": 0.0, "norm mu_c": 1.0,
              "predicted mu_c": 1.0, "error mu": 0.0} for _ in spec.class_counts]
    monkeypatch.setattr(claim_imbalanced, "measure_imbalanced",
                        lambda path, config: (SimpleNamespace(nc2_orthogonality=0.0), table))
    claim_imbalanced.imbalanced(str(tmp_path), grid=spec, seeds=SEEDS)
    expected = [f"class {index} (n_c = {count})" for index, count in enumerate(COUNTS)]
    for points in drawn:
        (group,) = points.values()
        assert [name for _, _, name in group] == expected
