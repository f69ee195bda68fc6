"""``ncfast analyze`` and ``ncfast merge`` end to end, against direct ``ncfast.collapse`` calls."""
import csv
import errno
import json
import os
import re
import shutil
import signal

import numpy as np
import pytest
from matplotlib.image import imread
from safetensors.numpy import save_file

from cases import gaussian_classes, with_label_noise
from ncfast import ClassSums, collapse
import ncfast.analyze as analyze_module
from ncfast.analyze import analyze, write_results
from ncfast.engine import ResidualPass, finalize_pass1
from ncfast.cli import main
from ncfast.dumps import RunWriter
from ncfast.inputs import as_source
from ncfast.plots import write_plots
from ncfast.readers import file_sha256
from ncfast.states import (STATE_VERSION, UNDIGESTED_STATE_VERSION, load_state, merge_states,
                           report_of, save_state)

CLASSES, EPOCHS, LAYERS = 4, (1, 10, 100), ("penultimate", "linear1")
RTOL = 1e-9


def _checkpoint(epoch):
    """Two splits × two layers; the train labels are noisy, the classifier reads penultimate."""
    splits = {}
    for index, (split, rows) in enumerate((("train", 400), ("test", 200))):
        seed = 10 * epoch + index
        layer_a = gaussian_classes(rows, 6, CLASSES, spread=1.0 / epoch, seed=seed)
        labels = layer_a["labels"]
        rng = np.random.default_rng(seed)
        linear1 = (3.0 * rng.normal(size=(CLASSES, 9)))[labels] + rng.normal(size=(rows, 9))
        entry = {"features": {"penultimate": layer_a["features"],
                              "linear1": linear1.astype(np.float32)},
                 "labels": labels, "clean_labels": None}
        if split == "train":
            noisy = with_label_noise(layer_a, rate=0.2, seed=seed)
            entry["labels"], entry["clean_labels"] = noisy["labels"], noisy["clean_labels"]
        splits[split] = entry
    return splits, layer_a["weights"], layer_a["bias"]


@pytest.fixture(scope="module")
def written_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "run"
    writer = RunWriter(path, config={"model": "mlp"}, num_classes=CLASSES)
    data = {}
    for epoch in EPOCHS:
        splits, weights, bias = _checkpoint(epoch)
        writer.write_checkpoint(epoch, splits, weights=weights, bias=bias,
                                classifier_layer="penultimate")
        data[epoch] = (splits, weights, bias)
    return str(path), data


def _expected_reports(splits, weights, bias, layer):
    classifier = {"weights": weights, "bias": bias} if layer == "penultimate" else {}
    train = splits["train"]
    train_report = collapse(train["features"][layer], train["labels"], num_classes=CLASSES,
                            clean_labels=train["clean_labels"], **classifier)
    test = splits["test"]
    test_report = collapse(test["features"][layer], test["labels"], num_classes=CLASSES,
                           means=train_report, **classifier)
    return {"train": train_report, "test": test_report}


def _assert_row_matches(row, report):
    for key, expected in report.to_dict().items():
        actual = row.get(key)  # metrics no row defines are left out of the file
        if isinstance(expected, (str, int)) or expected is None:
            assert actual == expected, key
            continue
        to_float = lambda value: np.array(  # noqa: E731
            [np.nan if item is None else item for item in np.atleast_1d(value)], float)
        np.testing.assert_allclose(to_float(actual), to_float(expected), rtol=RTOL,
                                   err_msg=key)


def test_every_checkpoint_split_and_layer_matches_direct_collapse(written_run):
    path, data = written_run
    analysis = analyze([path], use_cache=False, progress=False, chunk_size=64)
    assert analysis.failures == []
    assert len(analysis.rows) == len(EPOCHS) * 2 * len(LAYERS)
    expected = {}
    for row in analysis.rows:
        group = (row["epoch"], row["layer"])
        if group not in expected:
            expected[group] = _expected_reports(*data[row["epoch"]], row["layer"])
        _assert_row_matches(row, expected[group][row["split"]])
        assert row["measured_against"] == "train"
        assert (row["accuracy"] is not None) == (row["layer"] == "penultimate")
        assert (row["memorization"] is not None) == (row["split"] == "train")


def test_cli_writes_table_json_csv_and_valid_pngs(written_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # a table wide enough to show whole names
    path, _ = written_run
    out = tmp_path / "out"
    assert main(["analyze", path, "--out", str(out), "--no-progress", "--no-cache",
                 "--metrics", "nc1", "nc3", "accuracy", "memorization"]) == 0
    printed = capsys.readouterr().out
    assert "penultimate" in printed and "nc1" in printed
    document = json.loads((out / "metrics.json").read_text())
    assert len(document["rows"]) == 12 and document["failures"] == []
    with open(out / "metrics.csv", newline="") as stream:
        table = list(csv.DictReader(stream))
    assert len(table) == 12
    assert {row["split"] for row in table} == {"train", "test"}
    assert float(table[0]["nc1"]) == pytest.approx(document["rows"][0]["nc1"], rel=1e-15)
    for name in ("nc1.png", "nc3.png", "accuracy.png", "memorization_vs_dilation.png"):
        image = imread(out / name)
        assert os.path.getsize(out / name) > 1000
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image.std() > 0  # something was drawn


def test_metrics_and_layers_options_select(written_run, tmp_path):
    path, _ = written_run
    out = tmp_path / "out"
    assert main(["analyze", path, "--out", str(out), "--no-progress", "--no-cache",
                 "--metrics", "nc1", "nc2_etf", "--layers", "linear1"]) == 0
    with open(out / "metrics.csv", newline="") as stream:
        table = list(csv.DictReader(stream))
    assert {row["layer"] for row in table} == {"linear1"}
    assert list(table[0])[-2:] == ["nc1", "nc2_etf"]
    assert sorted(name for name in os.listdir(out) if name.endswith(".png")) == [
        "nc1.png", "nc2_etf.png", "snapshot-run-epoch100-linear1-test.png",
        "snapshot-run-epoch100-linear1-train.png"]


def test_cache_measures_only_new_or_changed_checkpoints(tmp_path, monkeypatch):
    path = tmp_path / "run"
    writer = RunWriter(path, config={}, num_classes=CLASSES)
    for epoch in (1, 2):
        splits, weights, bias = _checkpoint(epoch)
        writer.write_checkpoint(epoch, splits, weights=weights, bias=bias,
                                classifier_layer="penultimate")
    first = analyze([path], progress=True)  # the progress bar goes to stderr
    assert (first.measured, first.cached) == (4, 0)
    again = analyze([path], progress=False)
    assert (again.measured, again.cached) == (0, 4)
    assert again.rows == first.rows
    splits, weights, bias = _checkpoint(3)
    writer.write_checkpoint(3, splits, weights=weights, bias=bias,
                            classifier_layer="penultimate")
    grown = analyze([path], progress=False)
    assert (grown.measured, grown.cached) == (2, 4)
    # Same size, new content, written after the manifest: not what the run wrote, refused.
    changed = path / "checkpoints/epoch_000001/test/features/linear1.npy"
    features = np.load(changed)
    np.save(changed, features[::-1].copy())
    after_edit = analyze([path], progress=False)
    (failure,) = after_edit.failures
    assert "does not match the SHA-256 the run manifest recorded" in failure.reason
    assert (after_edit.measured, after_edit.cached) == (0, 5)  # epoch 1 penultimate: cached
    np.save(changed, features)  # the bytes the run wrote again: cached as before
    assert analyze([path], progress=False).cached == 6
    # Rows cached by an ncfast whose metrics differed are measured again.
    monkeypatch.setattr(analyze_module, "CACHE_VERSION", analyze_module.CACHE_VERSION + 1)
    newer = analyze([path], progress=False)
    assert (newer.measured, newer.cached) == (6, 0)


def _write_npz(path, rows=120, **overrides):
    case = gaussian_classes(rows, 5, 3, seed=rows)
    arrays = {"features": case["features"], "labels": case["labels"],
              "weights": case["weights"], "bias": case["bias"], **overrides}
    np.savez(path, **arrays)
    return case


def test_single_files_with_separate_labels_and_classifier(tmp_path):
    case = gaussian_classes(300, 5, 3, seed=4)
    for name in ("features", "labels", "weights", "bias"):
        np.save(tmp_path / f"{name}.npy", case[name])
    analysis = analyze([tmp_path / "features.npy"], labels=tmp_path / "labels.npy",
                       weights=tmp_path / "weights.npy", bias=tmp_path / "bias.npy",
                       progress=False, use_cache=False)
    assert analysis.failures == []
    (row,) = analysis.rows
    _assert_row_matches(row, collapse(case["features"], case["labels"],
                                      weights=case["weights"], bias=case["bias"]))
    assert row["epoch"] is None and row["measured_against"] == "train"


@pytest.mark.parametrize("break_it, message", [
    (lambda path: _write_npz(path, labels=np.zeros(119, np.int64)),
     r"labels\]: has 119 labels but .*features\] has 120 rows"),
    (lambda path: _write_npz(path, features=np.ones((120, 5), np.int32)),
     r"features\]: features must be floating point; found int32"),
    (lambda path: open(path, "wb").write(b"PK\x03\x04 truncated"), "not a readable npz file"),
    (lambda path: _write_npz(path, labels=np.where(np.arange(120) == 5, -1, np.arange(120) % 3)),
     r"row 5 has label -1, outside \[0, 3\)"),
])
def test_a_bad_file_is_reported_by_name_and_the_others_are_kept(tmp_path, break_it, message,
                                                                capsys):
    good = [tmp_path / "epoch_1.npz", tmp_path / "epoch_3.npz"]
    for path in good:
        _write_npz(path)
    bad = tmp_path / "epoch_2.npz"
    break_it(bad)
    analysis = analyze([good[0], bad, good[1]], progress=False)
    assert [row["epoch"] for row in analysis.rows] == [1, 3]
    (failure,) = analysis.failures
    assert str(bad) in failure.reason or str(bad) in failure.name
    assert re.search(message, failure.reason), failure.reason
    code = main(["analyze", str(good[0]), str(bad), str(good[1]), "--out",
                 str(tmp_path / "out"), "--no-progress", "--no-plots"])
    assert code == 1
    printed = capsys.readouterr().err
    failed_lines = [line for line in printed.splitlines() if "FAILED" in line]
    assert len(failed_lines) == 1 and "epoch_2.npz" in failed_lines[0]
    assert re.search(message, failed_lines[0]), failed_lines[0]  # "[key]" survives rich markup
    assert len(json.loads((tmp_path / "out/metrics.json").read_text())["rows"]) == 2


def _write_run(path, epochs):
    writer = RunWriter(path, config={}, num_classes=CLASSES)
    for epoch in epochs:
        splits, weights, bias = _checkpoint(epoch)
        writer.write_checkpoint(epoch, splits, weights=weights, bias=bias,
                                classifier_layer="penultimate")
    return path


def _run_with_three_checkpoints(tmp_path):
    return _write_run(tmp_path / "run", (1, 2, 3))


def test_missing_and_truncated_run_files_are_named_and_others_kept(tmp_path):
    path = _run_with_three_checkpoints(tmp_path)
    missing = path / "checkpoints/epoch_000001/test/labels.npy"
    os.remove(missing)
    truncated = path / "checkpoints/epoch_000003/train/features/linear1.npy"
    with open(truncated, "r+b") as stream:
        stream.truncate(300)
    analysis = analyze([path], progress=False)
    assert {row["epoch"] for row in analysis.rows} == {2}
    reasons = {failure.name: failure.reason for failure in analysis.failures}
    assert set(reasons) == {f"{path} epoch 1", f"{path} epoch 3"}
    assert str(missing) in reasons[f"{path} epoch 1"] and "missing" in reasons[f"{path} epoch 1"]
    assert str(truncated) in reasons[f"{path} epoch 3"]


def test_nan_rows_are_named_with_the_file(tmp_path):
    paths = [tmp_path / f"epoch_{epoch}.npz" for epoch in (1, 2, 3)]
    for path in paths:
        case = _write_npz(path)
    features = case["features"].copy()
    features[17, 2] = np.nan
    _write_npz(paths[1], features=features)
    analysis = analyze(paths, progress=False, use_cache=False)
    (failure,) = analysis.failures
    assert str(paths[1]) in failure.reason and "row 17 contains NaN" in failure.reason
    assert {row["epoch"] for row in analysis.rows} == {1, 3}


def test_separate_arrays_for_a_file_that_holds_them_are_refused(tmp_path):
    """--weights silently replaced the file's own classifier, and --labels gave every split
    of a file the same labels."""
    path = tmp_path / "dump.npz"
    case = _write_npz(path)
    np.save(tmp_path / "weights.npy", -case["weights"])
    np.save(tmp_path / "labels.npy", case["labels"])
    (failure,) = analyze([path], weights=tmp_path / "weights.npy", progress=False).failures
    assert f"{path}: holds its own weights; --weights applies to files that lack them" in \
        failure.reason
    np.savez(path, **{"train/features": case["features"], "test/features": case["features"]})
    (failure,) = analyze([path], labels=tmp_path / "labels.npy", progress=False).failures
    assert f"{path}: holds the splits ['test', 'train']; --labels gives one array" in \
        failure.reason


def test_cli_one_line_errors_for_bad_arguments(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "nothing.npy"), "--no-progress"]) == 1
    assert "nothing.npy: no such file" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path), "--metrics", "nc9", "--no-progress"]) == 1
    assert "unknown metric(s) nc9" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path), "--metrics", "nc1", "nc5", "--no-progress"]) == 1
    assert "nc5 needs out-of-distribution rows, which ncfast analyze does not read" in \
        capsys.readouterr().err
    RunWriter(tmp_path / "run", config={}, num_classes=CLASSES)
    np.save(tmp_path / "labels.npy", np.zeros(3, np.int64))
    assert main(["analyze", str(tmp_path / "run"), "--labels", str(tmp_path / "labels.npy"),
                 "--no-progress"]) == 1
    assert "--labels applies to feature files" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "part[1].safetensors")]) == 1
    assert "part[1].safetensors: no such state file" in capsys.readouterr().err


def _shards(case, count):
    bounds = np.linspace(0, len(case["labels"]), count + 1).astype(int)
    return [{key: case[key][start:stop] for key in ("features", "labels", "clean_labels")}
            for start, stop in zip(bounds[:-1], bounds[1:])]


def test_merge_of_saved_partial_states_equals_one_analysis(tmp_path, capsys):
    case = with_label_noise(gaussian_classes(900, 8, 4, seed=7), rate=0.25)
    shards = _shards(case, 3)
    pass1_paths = []
    for index, shard in enumerate(shards):
        sums = ClassSums(4, 8, track_clean=True)
        sums.update(shard["features"], shard["labels"], shard["clean_labels"])
        pass1_paths.append(tmp_path / f"pass1_{index}.safetensors")
        save_state(pass1_paths[-1], sums)
    assert main(["merge", *map(str, pass1_paths), "--out", str(tmp_path / "m1")]) == 0
    merged_pass1 = load_state(tmp_path / "m1/pass1.safetensors")
    geometry, clean_geometry = finalize_pass1(merged_pass1)
    pass2_paths = []
    for index, shard in enumerate(shards):
        state = ResidualPass(geometry, clean_geometry, weights=case["weights"], bias=case["bias"])
        for chunk in as_source(shard["features"], shard["labels"], shard["clean_labels"]):
            state.update(chunk.features, chunk.labels, chunk.clean_labels, row_offset=chunk.offset)
        pass2_paths.append(tmp_path / f"pass2_{index}.safetensors")
        save_state(pass2_paths[-1], state)
        assert os.path.getsize(pass2_paths[-1]) < 20_000
    assert main(["merge", *map(str, pass2_paths), "--out", str(tmp_path / "m2")]) == 0
    (row,) = json.loads((tmp_path / "m2/metrics.json").read_text())["rows"]
    _assert_row_matches(row, collapse(case["features"], case["labels"], weights=case["weights"],
                                      bias=case["bias"], clean_labels=case["clean_labels"]))
    capsys.readouterr()
    assert main(["merge", str(pass1_paths[0]), str(pass2_paths[0])]) == 1
    assert "cannot merge with" in capsys.readouterr().err


def test_states_round_trip_and_refuse_other_means(tmp_path, assert_same_report):
    case = gaussian_classes(200, 6, 3, seed=2)
    sums = ClassSums(3, 6).update(case["features"], case["labels"])
    save_state(tmp_path / "sums.safetensors", sums)
    assert load_state(tmp_path / "sums.safetensors") == sums
    geometry, _ = finalize_pass1(sums, global_mean="samples")
    state = ResidualPass(geometry, weights=case["weights"])
    for chunk in as_source(case["features"], case["labels"]):
        state.update(chunk.features, chunk.labels, chunk.clean_labels, row_offset=chunk.offset)
    save_state(tmp_path / "pass2.safetensors", state.stats)
    loaded = load_state(tmp_path / "pass2.safetensors")
    assert loaded == state.stats
    assert_same_report(report_of(loaded), collapse(case["features"], case["labels"],
                                                   weights=case["weights"],
                                                   global_mean="samples"))
    other_geometry, _ = finalize_pass1(ClassSums(3, 6).update(case["features"][::2],
                                                              case["labels"][::2]))
    save_state(tmp_path / "other.safetensors", ResidualPass(other_geometry).stats)
    with pytest.raises(ValueError, match="other.safetensors: cannot merge"):
        merge_states([tmp_path / "pass2.safetensors", tmp_path / "other.safetensors"])
    save_file({"sums": np.zeros((3, 6))}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="plain.safetensors: not an ncfast state"):
        load_state(tmp_path / "plain.safetensors")
    # Version 2 kept the "features" route's D×D scatter: refused, not misread.
    save_file({"sums": np.zeros((3, 6))}, tmp_path / "old.safetensors",
              metadata={"ncfast_state": "ResidualStats", "version": "2"})
    with pytest.raises(ValueError, match="old.safetensors: not an ncfast state file of "
                                         f"version {UNDIGESTED_STATE_VERSION}, .*{STATE_VERSION} "
                                         ".*version '2'"):
        load_state(tmp_path / "old.safetensors")
    with open(tmp_path / "pass2.safetensors", "r+b") as stream:
        stream.truncate(500)
    with pytest.raises(ValueError, match="pass2.safetensors: not a readable state file"):
        load_state(tmp_path / "pass2.safetensors")


@pytest.mark.parametrize("relative, replacement, message", [
    ("train/labels.npy", np.zeros(399, np.int64), r"int64 array of shape \(399,\), but the "
                                                  r"manifest says int64 \(400,\)"),
    ("test/features/linear1.npy", np.zeros((200, 9), np.int32), "int32 array of shape"),
])
def test_run_files_replaced_after_writing_are_named(tmp_path, relative, replacement, message):
    path = _run_with_three_checkpoints(tmp_path)
    replaced = path / "checkpoints/epoch_000002" / relative
    np.save(replaced, replacement)
    analysis = analyze([path], progress=False, use_cache=False)
    (failure,) = analysis.failures
    assert failure.name == f"{path} epoch 2"
    assert str(replaced) in failure.reason
    assert re.search(message, failure.reason), failure.reason
    assert {row["epoch"] for row in analysis.rows} == {1, 3}


# --- the cache ------------------------------------------------------------------------------

def _deeply_nested(document):
    return '{"results": {}, "digests": {}, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"


@pytest.mark.parametrize("malform", [
    lambda document: json.dumps({"results": {}, "digests": []}),
    lambda document: json.dumps({"results": {}, "digests": None}),
    lambda document: json.dumps({**document, "digests": {"epoch_1.npz": "x"}}),
    lambda document: json.dumps({**document, "note": float("nan")}),
    lambda document: json.dumps({**document, "results": {
        key: [{**row, "nc1": float("nan")} for row in rows]
        for key, rows in document["results"].items()}}),
    lambda document: json.dumps({**document,
                                 "results": dict.fromkeys(document["results"], [{}])}),
    lambda document: json.dumps({**document,
                                 "results": dict.fromkeys(document["results"], "junk")}),
    lambda document: json.dumps(document).replace('"nc1": ', '"nc1": 1e3 + '),  # not JSON
    _deeply_nested,
], ids=["digests list", "digests null", "digest a string", "NaN beside", "NaN in a row",
        "row empty", "rows a string", "not JSON", "nested 100,000 deep"])
def test_a_malformed_cache_is_measured_again_and_rewritten(tmp_path, malform):
    path = tmp_path / "epoch_1.npz"
    _write_npz(path)
    first = analyze([path], progress=False)
    cache = tmp_path / "epoch_1.npz.ncfast-cache.json"
    cache.write_text(malform(json.loads(cache.read_text())))
    again = analyze([path], progress=False)
    assert again.failures == [] and (again.measured, again.cached) == (1, 0)
    assert again.rows == first.rows
    rewritten = analyze([path], progress=False)
    assert (rewritten.measured, rewritten.cached) == (0, 1) and rewritten.rows == first.rows


def test_a_named_pipe_in_place_of_a_run_file_is_named(tmp_path, fail_instead_of_hanging):
    """It was reported as missing from the run folder."""
    path = _run_with_three_checkpoints(tmp_path)
    replaced = path / "checkpoints/epoch_000002/train/labels.npy"
    replaced.unlink()
    os.mkfifo(replaced)
    (failure,) = analyze([path], progress=False, use_cache=False).failures
    assert f"{replaced}: listed in the run manifest, but is a named pipe (FIFO)" in \
        failure.reason


def test_a_named_pipe_as_the_cache_is_ignored_and_replaced(tmp_path, fail_instead_of_hanging):
    """open() of a FIFO waits for a writer: the analysis hung."""
    path = tmp_path / "epoch_1.npz"
    _write_npz(path)
    cache = tmp_path / "epoch_1.npz.ncfast-cache.json"
    os.mkfifo(cache)
    analysis = analyze([path], progress=False)
    assert analysis.failures == [] and analysis.measured == 1
    assert cache.is_file() and analyze([path], progress=False).cached == 1


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "no-cache"])
def test_a_run_file_replaced_by_another_of_the_same_size_is_refused(tmp_path, monkeypatch,
                                                                    use_cache):
    """cp -p of epoch 3's features over epoch 1's (same size, an mtime older than the
    manifest): their digest is not the one the manifest recorded. It used to be measured
    (the bit flip of a label too), as if the run had written it."""
    path = _run_with_three_checkpoints(tmp_path)
    assert analyze([path], progress=False).measured == 6
    replaced = path / "checkpoints/epoch_000001/train/features/penultimate.npy"
    original = replaced.read_bytes()
    shutil.copy2(path / "checkpoints/epoch_000003/train/features/penultimate.npy", replaced)
    after = analyze([path], progress=False, use_cache=use_cache)
    (failure,) = after.failures
    assert f"{replaced}: its content does not match the SHA-256 the run manifest recorded" \
        in failure.reason
    assert {row["epoch"] for row in after.rows} == {2, 3}
    # Restored, and a file whose status changed but not its content: hashed once, then known.
    replaced.write_bytes(original)
    hashed = []
    monkeypatch.setattr(analyze_module, "file_sha256",
                        lambda file: hashed.append(file) or file_sha256(file))
    os.chmod(replaced, 0o640)
    for _ in range(2):
        assert analyze([path], progress=False).cached == 6
        assert len(hashed) == 1 and os.path.samefile(hashed[0], replaced)


def test_a_run_file_changed_before_a_later_checkpoint_is_refused(tmp_path, monkeypatch):
    """The manifest's digests were trusted for files whose status had not changed since the
    manifest was last written: a later checkpoint (a resumed run) moved that time past an
    edit of an earlier one's file, which was then measured as what the run wrote."""
    hashed = []
    monkeypatch.setattr(analyze_module, "file_sha256",
                        lambda file: hashed.append(file) or file_sha256(file))
    path = _write_run(tmp_path / "run", (1, 2))
    assert analyze([path], progress=False, use_cache=False).measured == 4
    assert hashed == []  # the files the run wrote take their recorded digests
    changed = path / "checkpoints/epoch_000001/train/features/penultimate.npy"
    np.save(changed, np.load(changed)[::-1].copy())  # same size, other rows
    splits, weights, bias = _checkpoint(3)
    RunWriter(path, config={}, num_classes=CLASSES).write_checkpoint(
        3, splits, weights=weights, bias=bias, classifier_layer="penultimate")
    after = analyze([path], progress=False)
    (failure,) = after.failures
    assert f"{changed}: its content does not match the SHA-256 the run manifest recorded" \
        in failure.reason
    assert {row["epoch"] for row in after.rows} == {2, 3}


# --- inputs refused, and the others kept ----------------------------------------------------

def test_a_split_without_rows_is_left_out_and_the_others_measured(tmp_path, capsys):
    """An empty test split failed the whole checkpoint with the engine's wording ("the chunk
    source yielded no chunks"); empty train features are named as such."""
    case = gaussian_classes(60, 4, 3, seed=1)
    path = tmp_path / "dump.npz"
    np.savez(path, **{"features": case["features"], "labels": case["labels"],
                      "test/features": case["features"][:0], "test/labels": case["labels"][:0]})
    assert main(["analyze", str(path), "--out", str(tmp_path / "out"), "--no-progress",
                 "--no-plots", "--no-cache"]) == 0
    assert f"warning: {path} [test/features]: holds no rows; the test split is left out" in \
        capsys.readouterr().err
    np.savez(path, features=case["features"][:0], labels=case["labels"][:0])
    (failure,) = analyze([path], progress=False, use_cache=False).failures
    assert f"{path} [features]: holds no rows; save the features of at least one row" in \
        failure.reason


def test_a_split_with_labels_but_no_features_is_refused(tmp_path):
    case = gaussian_classes(60, 4, 3, seed=1)
    path = tmp_path / "dump.npz"
    np.savez(path, **{"train/features": case["features"], "train/labels": case["labels"],
                      "test/labels": case["labels"]})
    analysis = analyze([path], progress=False, use_cache=False)
    (failure,) = analysis.failures
    assert analysis.rows == []
    assert f"{path}: split 'test' has labels but no features" in failure.reason


def test_arrays_of_names_ncfast_does_not_read_are_refused_by_name(tmp_path):
    case = with_label_noise(gaussian_classes(60, 4, 3, seed=1), rate=0.2)
    path = tmp_path / "dump.npz"
    np.savez(path, **{"train/features": case["features"], "train/labels": case["labels"],
                      "train/clean_label": case["clean_labels"], "test/feats": case["features"]})
    (failure,) = analyze([path], progress=False, use_cache=False).failures
    assert "holds arrays ncfast does not read ('train/clean_label', 'test/feats')" in \
        failure.reason


def test_a_bias_without_weights_is_refused(tmp_path):
    case = gaussian_classes(60, 4, 3, seed=1)
    np.savez(tmp_path / "dump.npz", features=case["features"], labels=case["labels"],
             bias=case["bias"])
    for name in ("features", "labels", "bias"):
        np.save(tmp_path / f"{name}.npy", case[name])
    analysis = analyze([tmp_path / "dump.npz"], progress=False, use_cache=False)
    assert re.search(r"dump\.npz \[bias\]: a classifier bias without weights",
                     analysis.failures[0].reason)
    analysis = analyze([tmp_path / "features.npy"], labels=tmp_path / "labels.npy",
                       bias=tmp_path / "bias.npy", progress=False, use_cache=False)
    assert "bias.npy: a classifier bias without weights" in analysis.failures[0].reason
    assert "--weights FILE" in analysis.failures[0].reason


@pytest.mark.parametrize("malform, field", [
    (lambda checkpoint: checkpoint.__setitem__("epoch", "1"), "epoch"),
    (lambda checkpoint: checkpoint["splits"]["train"]["features"]["penultimate"].__setitem__(
        "shape", "120x6"), "shape"),
    (lambda checkpoint: checkpoint.__setitem__("splits", {}), "splits"),
])
def test_a_malformed_manifest_fails_its_run_and_the_others_are_written(tmp_path, capsys,
                                                                      malform, field):
    good = _run_with_three_checkpoints(tmp_path / "good")
    bad = _run_with_three_checkpoints(tmp_path / "bad")
    manifest = json.loads((bad / "manifest.json").read_text())
    malform(manifest["checkpoints"][0])
    (bad / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "out"
    assert main(["analyze", str(good), str(bad), "--out", str(out), "--no-progress",
                 "--no-plots"]) == 1
    (failed,) = [line for line in capsys.readouterr().err.splitlines() if "FAILED" in line]
    assert f"{bad / 'manifest.json'}: " in failed and field in failed
    document = json.loads((out / "metrics.json").read_text())
    assert {row["source"] for row in document["rows"]} == {str(good)}


def test_a_typo_in_one_path_stops_the_run_before_it_measures(tmp_path, capsys, monkeypatch):
    """A missing path among good ones used to be reported after every other input was
    measured, and the partial results replaced an earlier analysis in --out."""
    import ncfast.analyze as analyze_module

    good = _run_with_three_checkpoints(tmp_path / "good")
    out = tmp_path / "out"
    for path, option in ((tmp_path / "typo", []),
                         (tmp_path / "labels.npy", ["--labels", str(tmp_path / "labels.npy")])):
        measured = []
        monkeypatch.setattr(analyze_module, "analyze",
                            lambda *args, **kwargs: measured.append(args) or None)
        paths = [str(good)] + ([str(path)] if not option else [])
        assert main(["analyze", *paths, *option, "--out", str(out), "--no-progress"]) == 1
        error = capsys.readouterr().err
        assert f"{path.name}: no such file or folder; check the path (nothing was measured" \
               in error, error
        assert measured == [] and not out.exists()


def test_an_input_failing_later_leaves_an_earlier_analysis_as_it_was(tmp_path, capsys):
    good = _run_with_three_checkpoints(tmp_path / "good")
    second = _write_run(tmp_path / "second", (1, 2))
    out = tmp_path / "out"
    assert main(["analyze", str(good), str(second), "--out", str(out), "--no-progress",
                 "--no-plots"]) == 0
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    (second / "manifest.json").write_text("{")
    assert main(["analyze", str(good), str(second), "--out", str(out), "--no-progress",
                 "--no-plots"]) == 1
    error = capsys.readouterr().err
    assert "holds an earlier analysis (metrics.json, metrics.csv), left as it was: 1 input(s) " \
           "failed" in error and "FAILED" in error
    assert "run again (the measured checkpoints are cached)" in error
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert main(["analyze", str(good), str(second), "--out", str(out), "--no-progress",
                 "--no-plots", "--no-cache"]) == 1
    error = capsys.readouterr().err  # no claim that --no-cache made false
    assert "holds an earlier analysis" in error and "cached" not in error


def test_caches_that_cannot_be_written_give_one_warning_line(tmp_path, capsys, monkeypatch):
    """A read-only run folder: Python's warning (with a source line) came once per
    checkpoint; the command line prints one line. (The checkpoints failed instead while
    ``write_atomically`` words the folder's error as a ValueError.)"""
    import ncfast.dumps as dumps_module

    create_temporary = dumps_module._create_temporary

    def read_only_checkpoints(folder, name):
        if name.endswith("ncfast-cache.json"):
            raise OSError(30, "Read-only file system", os.path.join(folder, name))
        return create_temporary(folder, name)

    monkeypatch.setattr(dumps_module, "_create_temporary", read_only_checkpoints)
    run = _run_with_three_checkpoints(tmp_path)
    assert main(["analyze", str(run), "--out", str(tmp_path / "out"), "--no-progress",
                 "--no-plots"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    (line,) = warned
    assert line.startswith("ncfast analyze: warning: cannot write analysis caches beside the "
                           "checkpoints (Read-only file system, first ") and \
        line.endswith("ncfast-cache.json); results are not cached")


def test_a_folder_in_the_place_of_a_cache_is_a_warning(tmp_path, capsys):
    folder = tmp_path / "dumps"
    folder.mkdir()
    _write_npz(folder / "epoch_1.npz")
    (folder / "epoch_1.npz.ncfast-cache.json").mkdir()
    out = tmp_path / "out"
    for _ in range(2):  # and again over the first run's results
        assert main(["analyze", str(folder / "epoch_1.npz"), "--out", str(out),
                     "--no-progress", "--no-plots"]) == 0
        error = capsys.readouterr().err
        assert "warning: cannot write analysis caches beside the checkpoints (it is a folder, " \
            "first " in error and "FAILED" not in error
    assert json.loads((out / "metrics.json").read_text())["failures"] == []


def test_a_warning_of_collapse_names_its_features_in_one_line(tmp_path, capsys):
    path = tmp_path / "epoch_1.npz"
    labels = np.arange(120) % 3
    _write_npz(path, labels=np.where(labels == 1, 3, labels),
               weights=np.ones((4, 5)), bias=np.zeros(4))
    assert main(["analyze", str(path), "--out", str(tmp_path / "out"), "--no-progress",
                 "--no-plots"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert warned == [f"ncfast analyze: warning: {path} [features]: 1 of 4 classes have no "
                      "rows (1); metrics cover the other classes"]


def test_a_file_name_that_is_not_utf8_is_measured_and_written(tmp_path, capsys):
    """Its name's lone surrogate failed every encode: nothing was written or printed."""
    folder = os.fsencode(tmp_path)
    name = os.path.join(folder, b"x\xff.npz")
    _write_npz(os.fsdecode(name))
    out = tmp_path / "out"
    assert main(["analyze", os.fsdecode(name), "--out", str(out), "--no-progress",
                 "--no-plots", "--format", "csv"]) == 0
    shown = f"{tmp_path}/x\\xff.npz"
    assert capsys.readouterr().out.splitlines()[1].startswith(f"{shown},")
    (row,) = json.loads((out / "metrics.json").read_text())["rows"]
    assert row["source"] == shown
    assert (out / "metrics.csv").read_text().splitlines()[1].startswith(f"{shown},")


def test_a_table_title_is_one_line_of_plain_text(tmp_path, capsys):
    path = tmp_path / "two\nlines \x1b[Kerased.npz"
    _write_npz(path)
    assert main(["analyze", str(path), "--out", str(tmp_path / "out"), "--no-progress",
                 "--no-plots", "--no-cache"]) == 0
    title = capsys.readouterr().out.splitlines()[1]
    assert title.startswith("two lines erased.npz, features / train")


def test_every_failure_is_one_line_of_plain_text(tmp_path):
    name = tmp_path / "two\nlines \x1b[1mbold\x1b[0m.npz"
    (failure,) = analyze([name], progress=False).failures
    assert "\n" not in failure.reason and "\x1b" not in failure.reason
    assert "two lines bold" in failure.reason


# --- writing OUT ----------------------------------------------------------------------------

@pytest.mark.parametrize("stop, status", [(KeyboardInterrupt, 130), (OSError(28, "No space"), 1)])
def test_a_write_stopped_while_drawing_leaves_out_as_it_was(tmp_path, monkeypatch, capsys,
                                                            stop, status):
    import ncfast.plots as plots

    out = tmp_path / "out"
    assert main(["analyze", str(_run_with_three_checkpoints(tmp_path)), "--out", str(out),
                 "--no-progress"]) == 0
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    later = _write_run(tmp_path / "later", (1, 2))
    save_figure, saved = plots.save_figure, []

    def save_two_then_stop(figure, path):
        if len(saved) == 2:
            raise stop
        saved.append(path)
        save_figure(figure, path)

    monkeypatch.setattr(plots, "save_figure", save_two_then_stop)
    capsys.readouterr()
    assert main(["analyze", str(later), "--out", str(out), "--no-progress"]) == status
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    if status == 1:  # it said which folder, and what to do
        assert f"cannot write the results into {out} (No space); free space or choose another " \
               "--out" in capsys.readouterr().err
    monkeypatch.setattr(plots, "save_figure", save_figure)
    assert main(["analyze", str(later), "--out", str(out), "--no-progress"]) == 0
    names = set(os.listdir(out))
    assert "snapshot-later-epoch2-linear1-test.png" in names
    assert not any(name.startswith("snapshot-run-") or name.startswith(".") for name in names)
    assert {row["source"] for row in json.loads((out / "metrics.json").read_text())["rows"]} \
        == {str(later)}


@pytest.mark.parametrize("no_cache", [[], ["--no-cache"]])
def test_a_disk_filling_while_writing_leaves_the_earlier_analysis_whole(tmp_path, monkeypatch,
                                                                        capsys, no_cache):
    """metrics.csv was replaced and metrics.json not when the disk filled between them; and
    the message said the checkpoints were cached under --no-cache too."""
    out = tmp_path / "out"
    options = ["--out", str(out), "--no-progress", *no_cache]
    assert main(["analyze", str(_run_with_three_checkpoints(tmp_path)), *options]) == 0
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    write_json = analyze_module.write_json_atomically

    def disk_full_at_metrics_json(path, document):
        if os.path.basename(path) == "metrics.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write_json(path, document)

    monkeypatch.setattr(analyze_module, "write_json_atomically", disk_full_at_metrics_json)
    capsys.readouterr()
    assert main(["analyze", str(_write_run(tmp_path / "later", (1, 2))), *options]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"cannot write the results into {out} (No space left " \
        "on device: metrics.json); " in error and f"{out} is left as it was" in error
    assert ".ncfast-staged" not in error  # the hidden folder it was staged in is gone
    assert ("(the measured checkpoints are cached)" in error) == (not no_cache)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


@pytest.fixture
def python_ctrl_c():
    """Python's own Ctrl-C handler for the test, whatever the process inherited: one started
    in the background by a non-interactive shell ignores SIGINT (Ctrl-C is then nothing)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_during_the_final_writes_is_held_until_they_are_done(tmp_path, monkeypatch,
                                                                    python_ctrl_c):
    out = tmp_path / "out"
    assert main(["analyze", str(_run_with_three_checkpoints(tmp_path)), "--out", str(out),
                 "--no-progress", "--metrics", "nc1"]) == 0
    later = _write_run(tmp_path / "later", (1, 2))
    replace = os.replace

    def press_ctrl_c_then_rename(source, target):
        if os.path.dirname(target) == str(out):  # a staged file renamed into place
            os.kill(os.getpid(), signal.SIGINT)
        replace(source, target)

    monkeypatch.setattr(os, "replace", press_ctrl_c_then_rename)
    assert main(["analyze", str(later), "--out", str(out), "--no-progress", "--metrics",
                 "nc1"]) == 130
    assert sorted(os.listdir(out)) == [
        "metrics.csv", "metrics.json", "nc1.png", *(f"snapshot-later-epoch2-{layer}-{split}.png"
                                                    for layer in ("linear1", "penultimate")
                                                    for split in ("test", "train"))]
    assert {row["source"] for row in json.loads((out / "metrics.json").read_text())["rows"]} \
        == {str(later)}


# --- cache keys, reference splits, row order, class counts and figures ---------------------

def _dump_split(rows, seed, noisy=False):
    """One split of a ``RunWriter`` checkpoint: ``rows`` rows of layer "a" (D = 6, C = 3),
    with noisy and clean labels when ``noisy``."""
    case = gaussian_classes(rows, 6, 3, seed=seed)
    entry = {"features": {"a": case["features"]}, "labels": case["labels"],
             "clean_labels": None}
    if noisy:
        case = with_label_noise(case, rate=0.2, seed=seed)
        entry["labels"], entry["clean_labels"] = case["labels"], case["clean_labels"]
    return entry


def test_layers_with_identical_features_keep_their_own_rows(tmp_path):
    """The cache key must name the layer; two layers of identical content (an identity
    or eval-mode dropout layer) took each other's cached rows, named after the other layer."""
    writer = RunWriter(tmp_path / "run", config={}, num_classes=3)
    train, test = _dump_split(300, 1), _dump_split(150, 2)
    for entry in (train, test):
        entry["features"]["b"] = entry["features"]["a"].copy()
    writer.write_checkpoint(1, {"train": train, "test": test})
    for _ in range(2):  # measured, then from the cache
        analysis = analyze([tmp_path / "run"], progress=False)
        assert analysis.failures == []
        assert sorted((row["layer"], row["split"]) for row in analysis.rows) == [
            ("a", "test"), ("a", "train"), ("b", "test"), ("b", "train")]


def test_clean_labels_of_a_held_out_split_are_not_used(tmp_path):
    """Only the train split is measured with clean labels; a test split that has
    them is measured against the train means without them (it failed: noise with means)."""
    writer = RunWriter(tmp_path / "run", config={}, num_classes=3)
    train, test = _dump_split(300, 1, noisy=True), _dump_split(150, 2, noisy=True)
    writer.write_checkpoint(1, {"train": train, "test": test})
    analysis = analyze([tmp_path / "run"], progress=False, use_cache=False)
    assert analysis.failures == []
    rows = {row["split"]: row for row in analysis.rows}
    assert rows["train"]["memorization"] is not None
    assert rows["test"]["memorization"] is None and rows["test"]["measured_against"] == "train"
    expected = collapse(test["features"]["a"], test["labels"], num_classes=3,
                        means=collapse(train["features"]["a"], train["labels"],
                                       clean_labels=train["clean_labels"], num_classes=3))
    assert rows["test"]["nc1"] == pytest.approx(expected.nc1, rel=1e-9)


def test_without_a_train_split_each_split_is_measured_against_its_own_means(tmp_path):
    """Without a train split, each split is measured against its own class means
    and says so in measured_against."""
    writer = RunWriter(tmp_path / "run", config={}, num_classes=3)
    val, test = _dump_split(300, 3), _dump_split(150, 4)
    writer.write_checkpoint(1, {"val": val, "test": test})
    analysis = analyze([tmp_path / "run"], progress=False, use_cache=False)
    assert analysis.failures == []
    rows = {row["split"]: row for row in analysis.rows}
    assert sorted(rows) == ["test", "val"]
    for split, entry in (("val", val), ("test", test)):
        assert rows[split]["measured_against"] == split
        expected = collapse(entry["features"]["a"], entry["labels"], num_classes=3)
        assert rows[split]["nc1"] == pytest.approx(expected.nc1, rel=1e-9), split


def test_rows_are_in_one_order_whatever_the_order_of_the_paths(tmp_path):
    """Rows (the table, metrics.csv, metrics.json) are sorted by run, epoch, layer
    and split, not left in the order the paths were given and measured."""
    for name in ("run_a", "run_b"):
        writer = RunWriter(tmp_path / name, config={}, num_classes=3)
        for epoch in (2, 1) if name == "run_a" else (1,):
            writer.write_checkpoint(epoch, {"train": _dump_split(120, epoch),
                                            "test": _dump_split(60, 9)})
    key = lambda row: (row["source"], row["epoch"], row["layer"], row["split"])  # noqa: E731
    forward = analyze([tmp_path / "run_a", tmp_path / "run_b"], progress=False, use_cache=False)
    backward = analyze([tmp_path / "run_b", tmp_path / "run_a"], progress=False,
                       use_cache=False)
    assert [key(row) for row in forward.rows] == sorted(map(key, forward.rows))
    assert [key(row) for row in backward.rows] == [key(row) for row in forward.rows]


def test_a_single_files_epoch_is_the_last_number_in_its_name(tmp_path):
    """``seed3_epoch12.npz`` is epoch 12, not 3."""
    case = gaussian_classes(120, 5, 3, seed=1)
    path = tmp_path / "seed3_epoch12.npz"
    np.savez(path, features=case["features"], labels=case["labels"])
    (row,) = analyze([path], progress=False, use_cache=False).rows
    assert row["epoch"] == 12


def test_classifier_rows_count_among_the_classes_of_a_single_file(tmp_path):
    """A file whose labels miss the last class still has the classifier's C classes."""
    case = gaussian_classes(150, 5, 3, seed=2)
    keep = case["labels"] < 2
    path = tmp_path / "feats.npz"
    np.savez(path, features=case["features"][keep], labels=case["labels"][keep],
             weights=case["weights"], bias=case["bias"])
    with pytest.warns(UserWarning):
        analysis = analyze([path], progress=False, use_cache=False)
    assert analysis.failures == []
    (row,) = analysis.rows
    assert row["num_classes"] == 3
    expected = collapse(case["features"][keep], case["labels"][keep], num_classes=3,
                        weights=case["weights"], bias=case["bias"], empty_classes="ignore")
    assert row["accuracy"] == pytest.approx(expected.accuracy, rel=1e-12)


@pytest.mark.parametrize("changed", ["weights", "labels"])
def test_a_changed_option_file_is_measured_again_not_taken_from_the_cache(tmp_path, changed):
    """The cache key covers --weights/--bias and --labels files; a new classifier
    or new labels beside the same features gave the cached (stale) rows."""
    case = gaussian_classes(300, 5, 3, seed=4)
    for name in ("features", "labels", "weights", "bias"):
        np.save(tmp_path / f"{name}.npy", case[name])
    options = {name: tmp_path / f"{name}.npy" for name in ("labels", "weights", "bias")}
    first = analyze([tmp_path / "features.npy"], progress=False, **options)
    assert (first.measured, first.cached) == (1, 0)
    rng = np.random.default_rng(0)
    if changed == "weights":
        case["weights"] = rng.normal(size=case["weights"].shape).astype(case["weights"].dtype)
    else:
        case["labels"] = rng.permutation(case["labels"])
    np.save(tmp_path / f"{changed}.npy", case[changed])
    again = analyze([tmp_path / "features.npy"], progress=False, **options)
    assert (again.measured, again.cached) == (1, 0)
    (row,) = again.rows
    expected = collapse(case["features"], case["labels"], weights=case["weights"],
                        bias=case["bias"])
    assert row["accuracy"] == pytest.approx(expected.accuracy, rel=1e-12)
    assert row["nc1"] == pytest.approx(expected.nc1, rel=1e-9)


def test_metrics_json_leaves_out_the_cosine_matrix(tmp_path):
    """The C'xC' cosine matrix is kept in the cache for the figures, never written to
    metrics.json (a 1000-class run would write a million numbers per row)."""
    case = gaussian_classes(120, 5, 3, seed=1)
    np.savez(tmp_path / "feats.npz", features=case["features"], labels=case["labels"])
    analysis = analyze([tmp_path / "feats.npz"], progress=False, use_cache=False)
    assert "cosine_matrix" in analysis.rows[0]
    write_results(analysis, tmp_path / "out")
    (row,) = json.loads((tmp_path / "out" / "metrics.json").read_text())["rows"]
    assert "cosine_matrix" not in row and row["nc1"] == pytest.approx(analysis.rows[0]["nc1"])


def test_another_global_mean_is_measured_again_not_taken_from_the_cache(tmp_path):
    """The cache key covers --global-mean; rows cached for "classes" were returned for
    "samples"."""
    case = gaussian_classes(600, 5, 3, seed=5, class_counts=[50, 150, 400])
    np.savez(tmp_path / "feats.npz", features=case["features"], labels=case["labels"])
    classes = analyze([tmp_path / "feats.npz"], progress=False, global_mean="classes")
    samples = analyze([tmp_path / "feats.npz"], progress=False, global_mean="samples")
    assert (samples.measured, samples.cached) == (1, 0)
    expected = collapse(case["features"], case["labels"], global_mean="samples")
    assert samples.rows[0]["nc2_etf"] == pytest.approx(expected.nc2_etf, rel=1e-9)
    assert samples.rows[0]["nc2_etf"] != pytest.approx(classes.rows[0]["nc2_etf"], rel=1e-6)


def test_clean_labels_count_among_the_classes_of_a_single_file(tmp_path):
    """A class present only among the clean labels (all its rows mislabelled) is a
    class; leaving it out made C too small and the file failed."""
    case = gaussian_classes(300, 5, 3, seed=6, classifier=False)
    clean = case["labels"]
    noisy = np.where(clean == 2, 0, clean)
    np.savez(tmp_path / "feats.npz", features=case["features"], labels=noisy,
             clean_labels=clean)
    with pytest.warns(UserWarning):
        analysis = analyze([tmp_path / "feats.npz"], progress=False, use_cache=False)
    assert analysis.failures == []
    (row,) = analysis.rows
    assert row["num_classes"] == 3


def test_one_checkpoint_draws_snapshots_but_no_metric_curves(tmp_path):
    """METRIC.png is drawn only when a run has two checkpoints or more."""
    writer = RunWriter(tmp_path / "run", config={}, num_classes=3)
    writer.write_checkpoint(1, {"train": _dump_split(120, 1)})
    analysis = analyze([tmp_path / "run"], progress=False, use_cache=False)
    written, _ = write_plots(analysis.rows, tmp_path / "out", ["nc1", "nc2_etf"])
    names = sorted(os.path.basename(path) for path in written)
    assert names == ["snapshot-run-epoch1-a-train.png"]


def test_runs_whose_names_make_one_file_name_get_a_snapshot_each(tmp_path):
    """``a b.npz`` and ``a_b.npz`` both became ``snapshot-a_b.npz-features-train.png``:
    one snapshot was drawn over the other."""
    for name in ("a b", "a_b"):
        _write_npz(tmp_path / f"{name}.npz")
    analysis = analyze([tmp_path / "a b.npz", tmp_path / "a_b.npz"], progress=False,
                       use_cache=False)
    written, _ = write_plots(analysis.rows, tmp_path / "out", ["nc1"])
    assert sorted(os.path.basename(path) for path in written) == [
        "snapshot-a_b.npz-features-train-2.png", "snapshot-a_b.npz-features-train.png"]


def test_files_differing_only_in_the_epoch_are_one_run(tmp_path):
    """``run_epoch1.npz, run_epoch2.npz, ...`` were each a run of their own: no curve was
    drawn, and snapshots were named ``snapshot-run_epoch1.npz-epoch1-...``."""
    for folder, name in (("a", "run_epoch1"), ("a", "run_epoch2"), ("a", "run_epoch10"),
                         ("b", "run_epoch3"), ("c", "x01"), ("c", "x1")):
        os.makedirs(tmp_path / folder, exist_ok=True)
        _write_npz(tmp_path / folder / f"{name}.npz")
    np.savez(tmp_path / "a" / "run_epoch4.npz", features=np.ones((6, 5), np.float32))
    paths = sorted(tmp_path.glob("*/*.npz"))
    analysis = analyze(paths, progress=False)
    series = str(tmp_path / "a" / "run_epoch.npz")
    assert sorted({(row["source"], row["epoch"]) for row in analysis.rows}) == sorted([
        (series, 1), (series, 2), (series, 10), (str(tmp_path / "b" / "run_epoch3.npz"), 3),
        (str(tmp_path / "c" / "x01.npz"), 1), (str(tmp_path / "c" / "x1.npz"), 1)])
    (failure,) = analysis.failures  # named by its file, not by the series
    assert failure.name == f"{tmp_path / 'a' / 'run_epoch4.npz'} epoch 4"
    assert failure.reason.startswith(f"{tmp_path / 'a' / 'run_epoch4.npz'}: split")
    assert all(os.path.exists(f"{path}.ncfast-cache.json") for path in paths
               if path.name != "run_epoch4.npz")
    written, _ = write_plots(analysis.rows, tmp_path / "out", ["nc1"])
    names = sorted(os.path.basename(path) for path in written)
    assert names[0] == "nc1.png"
    assert "snapshot-run_epoch.npz-epoch10-features-train.png" in names


@pytest.mark.parametrize("stray", ["labels", "clean_labels", "with weights", "--labels"])
def test_a_stray_label_is_refused_as_collapse_refuses_it(tmp_path, capsys, stray):
    """C was the largest label + 1: one stray label 500 among classes 0..2 gave a wrong NC1
    over 501 classes, 497 empty (with a classifier of 3 rows, an error about its shape)."""
    case = gaussian_classes(120, 5, 3, seed=7)
    labels = case["labels"].copy()
    labels[4] = 500
    path = tmp_path / "dump_epoch1.npz"
    arrays = {"features": case["features"], "labels": labels}
    holder, kind = f"{path} [labels]", "label"
    if stray == "clean_labels":
        arrays = {**arrays, "labels": case["labels"], "clean_labels": labels}
        holder, kind = f"{path} [clean_labels]", "clean label"
    elif stray == "with weights":
        arrays = {**arrays, "weights": case["weights"]}
    elif stray == "--labels":
        path, holder = tmp_path / "features.npy", str(tmp_path / "labels.npy")
        np.save(path, case["features"])
        np.save(holder, labels)
    if stray != "--labels":
        np.savez(path, **arrays)
    options = {"labels": holder} if stray == "--labels" else {}
    (failure,) = analyze([path], progress=False, use_cache=False, **options).failures
    with pytest.raises(ValueError) as refused:  # what ncfast.collapse says of these labels
        if kind == "label":
            collapse(case["features"], labels)
        else:
            collapse(case["features"], case["labels"], clean_labels=labels)
    # The same words but the option the command line lacks.
    offered = "; or pass num_classes= to accept the empty classes"
    assert offered in str(refused.value) and "num_classes=" not in failure.reason
    assert failure.reason == f"{holder}: {str(refused.value).replace(offered, '')}"
    assert f"row 4 has {kind} 500, but only 4 distinct labels occur" in failure.reason
    command = ["analyze", str(path), "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(command + (["--labels", holder] if options else [])) == 1
    (failed,) = [line for line in capsys.readouterr().err.splitlines() if "FAILED" in line]
    assert f"{holder}: row 4 has {kind} 500" in failed
    assert not (tmp_path / "out").exists()


def test_a_run_whose_manifest_gives_the_classes_may_leave_most_empty(tmp_path):
    """The stray-label refusal is for C inferred from the labels: a manifest's C stands."""
    case = gaussian_classes(120, 5, 3, seed=7)
    RunWriter(tmp_path / "run", config={}, num_classes=20).write_checkpoint(
        1, {"train": {"features": {"a": case["features"]}, "labels": case["labels"]}})
    with pytest.warns(UserWarning, match="17 of 20 classes have no rows"):
        analysis = analyze([tmp_path / "run"], progress=False, use_cache=False)
    assert analysis.failures == [] and analysis.rows[0]["num_classes"] == 20


def test_an_input_given_twice_is_refused_before_measuring(tmp_path, monkeypatch, capsys):
    """``a.npz a.npz ./a.npz`` measured one file three times: three identical rows."""
    monkeypatch.chdir(tmp_path)
    _write_npz(tmp_path / "a.npz")
    os.symlink("a.npz", "link.npz")
    for paths, said in ((["a.npz", "a.npz"], "a.npz is given twice;"),
                        (["a.npz", "b/../a.npz"], "a.npz is given twice (the second time as "
                                                  "b/../a.npz);"),
                        (["link.npz", "./a.npz"], "link.npz is given twice (the second time as "
                                                  "./a.npz);")):
        os.makedirs("b", exist_ok=True)
        with pytest.raises(ValueError, match=re.escape(said)):
            analyze(paths, progress=False)
        assert main(["analyze", *paths, "--out", "out", "--no-progress"]) == 1
        error = capsys.readouterr().err
        assert error.startswith(f"ncfast analyze: {said} pass each file or run folder once") \
            and error.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "b", "link.npz"]  # no cache, no out
