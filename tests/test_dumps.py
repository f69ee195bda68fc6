"""Run folders: the writer's round trip, resume, refusals and atomicity."""
import json
import os

import numpy as np
import pytest

from ncfast import dumps
from ncfast.dumps import MANIFEST, RunWriter, open_run, read_manifest
from ncfast.readers import file_sha256

CLASSES = 3


def _splits(seed, rows=40, clean=False):
    rng = np.random.default_rng(seed)
    splits = {}
    for split, num_rows in (("train", rows), ("test", rows // 2)):
        labels = np.arange(num_rows) % CLASSES
        splits[split] = {
            "features": {"penultimate": rng.normal(size=(num_rows, 5)).astype(np.float32),
                         "linear1": rng.normal(size=(num_rows, 7)).astype(np.float16)},
            "labels": labels,
            "clean_labels": (labels + 1) % CLASSES if clean and split == "train" else None}
    return splits


def _classifier(seed):
    rng = np.random.default_rng(seed)
    return {"weights": rng.normal(size=(CLASSES, 5)), "bias": rng.normal(size=CLASSES),
            "classifier_layer": "penultimate"}


def test_checkpoints_round_trip_with_lazily_opened_arrays(tmp_path):
    writer = RunWriter(tmp_path / "run", config={"lr": 0.1, "depth": [2, 3]},
                       num_classes=CLASSES, class_names=["a", "b", "c"])
    written = {}
    for epoch in (10, 1):  # out of order: the manifest keeps epochs ascending
        written[epoch] = _splits(epoch, clean=True)
        writer.write_checkpoint(epoch, written[epoch], **_classifier(epoch))
    assert writer.checkpoints() == [1, 10]
    run = open_run(tmp_path / "run")
    assert (run.config, run.num_classes, run.class_names) == (
        {"lr": 0.1, "depth": [2, 3]}, CLASSES, ["a", "b", "c"])
    assert [checkpoint.epoch for checkpoint in run.checkpoints] == [1, 10]
    for epoch, splits in written.items():
        checkpoint = run.checkpoint(epoch)
        assert checkpoint.classifier_layer == "penultimate"
        np.testing.assert_array_equal(checkpoint.weights.read(), _classifier(epoch)["weights"])
        np.testing.assert_array_equal(checkpoint.bias.read(), _classifier(epoch)["bias"])
        for split, arrays in splits.items():
            stored = checkpoint.splits[split]
            for layer, features in arrays["features"].items():
                np.testing.assert_array_equal(stored.features[layer].read(), features)
                assert stored.features[layer].dtype == str(features.dtype)
            np.testing.assert_array_equal(stored.labels.read(), arrays["labels"])
            assert (stored.clean_labels is None) == (arrays["clean_labels"] is None)


def test_manifest_records_each_files_digest_and_size(tmp_path):
    writer = RunWriter(tmp_path / "run", config={}, num_classes=CLASSES)
    writer.write_checkpoint(0, _splits(0))
    entry = read_manifest(tmp_path / "run")["checkpoints"][0]
    record = entry["splits"]["train"]["features"]["linear1"]
    path = tmp_path / "run" / record["file"]
    assert record["sha256"] == file_sha256(path)
    assert record["bytes"] == os.path.getsize(path)
    assert record["shape"] == [40, 7] and record["dtype"] == "float16"
    assert entry["classifier"] is None and entry["splits"]["test"]["clean_labels"] is None


def test_resuming_keeps_checkpoints_and_refuses_another_run(tmp_path):
    RunWriter(tmp_path / "run", config={"seed": 1}, num_classes=CLASSES).write_checkpoint(
        3, _splits(3))
    resumed = RunWriter(tmp_path / "run", config={"seed": 1}, num_classes=CLASSES)
    assert resumed.checkpoints() == [3]
    resumed.write_checkpoint(4, _splits(4))
    assert [item.epoch for item in open_run(tmp_path / "run").checkpoints] == [3, 4]
    with pytest.raises(ValueError, match=r"manifest.json: .*different config \(seed: 1, now "
                                         r"2; width: not set, now 8\); write to a new folder"):
        RunWriter(tmp_path / "run", config={"seed": 2, "width": 8}, num_classes=CLASSES)
    with pytest.raises(ValueError, match="different num_classes"):
        RunWriter(tmp_path / "run", config={"seed": 1}, num_classes=4)
    with pytest.raises(ValueError, match="epoch 3 is already written"):
        resumed.write_checkpoint(3, _splits(3))


def test_a_folder_of_other_files_is_not_taken_over(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and has no manifest.json"):
        RunWriter(tmp_path, config={}, num_classes=CLASSES)
    assert os.listdir(tmp_path) == ["notes.txt"]


@pytest.mark.parametrize("change, message", [
    (lambda s: s["train"].update(labels=s["train"]["labels"][:-1]), "39 entries but.*40 rows"),
    (lambda s: s["train"]["features"].update(penultimate=np.zeros((40, 5), np.int32)),
     r"\['penultimate'\]: features must be floating point"),
    (lambda s: s["train"].update(labels=s["train"]["labels"] * 1.0), "must be integer class"),
    (lambda s: s["test"]["features"].update(penultimate=np.zeros((20, 6), np.float32)),
     "has 6 features but another split has 5"),
    (lambda s: s["train"].update(labels=s["train"]["labels"] + 5), r"outside \[0, 3\)"),
    (lambda s: s["train"]["labels"].__setitem__(4, CLASSES), r"outside \[0, 3\): found 0\.\.3"),
    (lambda s: s["train"]["labels"].__setitem__(4, -1), r"outside \[0, 3\): found -1\.\.2"),
    (lambda s: s.update({"bad/name": s["train"]}), "cannot be a file name"),
    (lambda s: s["train"].update(labels=list(range(40))), "must be a numpy array"),
])
def test_bad_checkpoints_are_refused_before_anything_is_written(tmp_path, change, message):
    writer = RunWriter(tmp_path / "run", config={}, num_classes=CLASSES)
    splits = _splits(0)
    change(splits)
    with pytest.raises((ValueError, TypeError), match=message):
        writer.write_checkpoint(0, splits)
    assert os.listdir(tmp_path / "run") == [MANIFEST]


def test_classifier_needs_a_layer_of_its_width(tmp_path):
    writer = RunWriter(tmp_path / "run", config={}, num_classes=CLASSES)
    with pytest.raises(ValueError, match="pass classifier_layer="):
        writer.write_checkpoint(0, _splits(0), weights=np.zeros((CLASSES, 5)))
    with pytest.raises(ValueError, match=r"\(3, 7\)"):
        writer.write_checkpoint(0, _splits(0), weights=np.zeros((CLASSES, 5)),
                                classifier_layer="linear1")


def test_integer_classifier_weights_are_refused(tmp_path):
    writer = RunWriter(tmp_path / "run", config={}, num_classes=CLASSES)
    with pytest.raises(ValueError, match=r"weights must be a float array .*found \(3, 5\) int64"):
        writer.write_checkpoint(0, _splits(0), weights=np.ones((CLASSES, 5), np.int64),
                                classifier_layer="penultimate")
    assert os.listdir(tmp_path / "run") == [MANIFEST]


def test_big_endian_arrays_are_written_in_native_order(tmp_path):
    """The manifest names native dtypes: a big-endian array written as it was left the run
    unreadable (its '>f4' read as an edited manifest)."""
    writer = RunWriter(tmp_path / "run", config={}, num_classes=CLASSES)
    splits = _splits(0)
    features = splits["train"]["features"]["penultimate"]
    splits["train"]["features"]["penultimate"] = features.astype(">f4")
    splits["train"]["labels"] = splits["train"]["labels"].astype(">i8")
    writer.write_checkpoint(0, splits)
    train = open_run(tmp_path / "run").checkpoint(0).splits["train"]
    assert train.features["penultimate"].dtype == "float32"
    np.testing.assert_array_equal(train.features["penultimate"].read(), features)
    np.testing.assert_array_equal(train.labels.read(), np.arange(40) % CLASSES)


def test_an_interrupted_writer_leaves_only_complete_checkpoints(tmp_path, monkeypatch):
    writer = RunWriter(tmp_path / "run", config={}, num_classes=CLASSES)
    writer.write_checkpoint(1, _splits(1))
    before = (tmp_path / "run" / MANIFEST).read_bytes()
    calls = []
    real_save = np.save

    def crash_on_third_file(stream, array, **options):
        calls.append(1)
        if len(calls) == 3:
            stream.write(b"\x93NUMPY half-written")
            raise KeyboardInterrupt
        real_save(stream, array, **options)

    monkeypatch.setattr(dumps.np, "save", crash_on_third_file)
    with pytest.raises(KeyboardInterrupt):
        writer.write_checkpoint(2, _splits(2))
    monkeypatch.undo()
    assert (tmp_path / "run" / MANIFEST).read_bytes() == before
    assert [item.epoch for item in open_run(tmp_path / "run").checkpoints] == [1]
    leftovers = [name for _, _, names in os.walk(tmp_path / "run") for name in names
                 if name.endswith(".tmp")]
    assert leftovers == []
    # The rerun writes the checkpoint over the orphaned files.
    resumed = RunWriter(tmp_path / "run", config={}, num_classes=CLASSES)
    resumed.write_checkpoint(2, _splits(2))
    np.testing.assert_array_equal(
        open_run(tmp_path / "run").checkpoint(2).splits["test"].labels.read(),
        _splits(2)["test"]["labels"])


def test_unreadable_manifests_are_named(tmp_path):
    with pytest.raises(ValueError, match="no manifest.json"):
        open_run(tmp_path)
    (tmp_path / MANIFEST).write_text("{ not json")
    with pytest.raises(ValueError, match="manifest.json: not readable JSON"):
        open_run(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "ncfast-run", "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        open_run(tmp_path)


def test_config_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="JSON-serialisable"):
        RunWriter(tmp_path / "run", config={"model": object()}, num_classes=CLASSES)
    assert not (tmp_path / "run").exists()


def test_deeply_nested_json_is_an_unreadable_manifest(tmp_path):
    (tmp_path / MANIFEST).write_text('{"format": "ncfast-run", "x": ' + "[" * 100_000
                                     + "]" * 100_000 + "}")
    with pytest.raises(ValueError, match="manifest.json: not readable JSON"):
        open_run(tmp_path)


def _edit_manifest(run, change):
    manifest = json.loads((run / MANIFEST).read_text())
    change(manifest)
    (run / MANIFEST).write_text(json.dumps(manifest))


def _first(manifest):
    return manifest["checkpoints"][0]


@pytest.mark.parametrize("change, message", [
    (lambda m: _first(m).update(epoch="1"), r"checkpoints\[0\]\.epoch is '1', expected an int"),
    (lambda m: _first(m)["splits"]["train"]["features"]["penultimate"].update(shape="120x6"),
     r'checkpoints\[0\]\.splits\["train"\]\.features\["penultimate"\]\.shape is \'120x6\''),
    (lambda m: _first(m).update(splits={}), r"checkpoints\[0\]\.splits is \{\}, expected an "
                                            "object of one or more splits"),
    (lambda m: _first(m)["splits"]["test"].pop("labels"),
     r'checkpoints\[0\]\.splits\["test"\]\.labels is missing'),
    (lambda m: _first(m)["splits"]["test"]["labels"].update(shape=[19]),
     r'splits\["test"\]\.labels\.shape is \[19\], expected 20 rows'),
    (lambda m: _first(m)["splits"]["test"]["labels"].update(sha256=None), r"sha256 is None"),
    (lambda m: _first(m)["splits"]["train"]["labels"].update(dtype="object"),
     r"dtype is 'object', expected a float or int dtype"),
    (lambda m: _first(m).update(classifier_layer="nonexistent"),
     r"classifier_layer is 'nonexistent', expected the layer the classifier reads"),
    (lambda m: m["checkpoints"][1].update(epoch=1), r"checkpoints\[1\]\.epoch is 1, expected "
                                                    "an int >= 0 after the previous"),
    (lambda m: m["checkpoints"][1].update(path=_first(m)["path"] + "/"),
     r"checkpoints\[1\]\.path is .*, expected a folder of its own, not that of checkpoints\[0\]"),
    (lambda m: m.update(num_classes=True), "num_classes is True, expected an int >= 2"),
    (lambda m: m.update(class_names=["a"]), r"class_names is \['a'\], expected null or a list "
                                            "of 3 strings"),
    (lambda m: m.update(checkpoints={}), r"checkpoints is \{\}, expected a list"),
], ids=["epoch-string", "shape-string", "no-splits", "labels-missing", "rows-differ",
        "sha256-null", "dtype-object", "classifier-layer-unknown", "epoch-repeated",
        "folder-shared", "num-classes-bool", "class-names-short", "checkpoints-object"])
def test_malformed_manifests_are_refused_naming_the_field(tmp_path, change, message):
    writer = RunWriter(tmp_path / "run", config={}, num_classes=CLASSES)
    for epoch in (1, 2):
        writer.write_checkpoint(epoch, _splits(epoch), **_classifier(epoch))
    _edit_manifest(tmp_path / "run", change)
    with pytest.raises(ValueError, match=r"run/manifest.json: " + ".*" + message):
        open_run(tmp_path / "run")
    with pytest.raises(ValueError, match=message):  # nor is such a run resumed
        RunWriter(tmp_path / "run", config={}, num_classes=CLASSES)


@pytest.mark.parametrize("field", ["path", "file"])
@pytest.mark.parametrize("where", ["absolute", "parent", "symlink"])
def test_manifest_paths_must_stay_inside_the_run_folder(tmp_path, field, where):
    run = tmp_path / "run"
    RunWriter(run, config={}, num_classes=CLASSES).write_checkpoint(0, _splits(0))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "labels.npy").write_bytes((run / "checkpoints/epoch_000000/train/labels.npy")
                                         .read_bytes())
    target = {"absolute": str(outside), "parent": "../outside", "symlink": "link"}[where]
    if where == "symlink":
        os.symlink(outside, run / "link")
    if field == "path":
        _edit_manifest(run, lambda manifest: _first(manifest).update(path=target))
        expected = r"checkpoints\[0\]\.path"
    else:
        _edit_manifest(run, lambda manifest: _first(manifest)["splits"]["train"]["labels"]
                       .update(file=f"{target}/labels.npy"))
        expected = r'checkpoints\[0\]\.splits\["train"\]\.labels\.file'
    inside = "relative to" if where == "absolute" else "inside"
    with pytest.raises(ValueError, match=rf"manifest.json: {expected} is .*expected a path "
                                         rf"{inside} the run folder"):
        open_run(run)


def test_a_link_inside_the_run_folder_may_be_followed(tmp_path):
    run = tmp_path / "run"
    RunWriter(run, config={}, num_classes=CLASSES).write_checkpoint(0, _splits(0))
    os.symlink("checkpoints/epoch_000000", run / "latest")
    _edit_manifest(run, lambda manifest: _first(manifest).update(path="latest"))
    assert open_run(run).folders[0] == os.path.join(str(run), "latest")


@pytest.mark.parametrize("create", [False, True])
def test_output_folders_that_cannot_be_created_are_refused_up_front(tmp_path, monkeypatch,
                                                                    create):
    monkeypatch.chdir(tmp_path)
    os.symlink(tmp_path / "nonexistent" / "target", "dangling")
    with pytest.raises(ValueError, match="the --out folder is an empty name"):
        dumps.check_output_folder("", what="--out folder", create=create)
    for path in ("dangling", "dangling/inner"):
        with pytest.raises(ValueError, match=f"cannot write the --out folder '{path}': .*"
                                             "'dangling' is a broken symbolic link"):
            dumps.check_output_folder(path, what="--out folder", create=create)
    assert sorted(os.listdir(tmp_path)) == ["dangling"]
    dumps.check_output_folder("new/folder", what="--out folder", create=create)
    assert (tmp_path / "new" / "folder").is_dir() == create
