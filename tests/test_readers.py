"""Readers: every format round-trips, streams in row blocks, and fails with the file's name."""
import os
import zipfile

import h5py
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_safetensors
from safetensors.torch import save_file as save_torch_safetensors

from ncfast.readers import _MappedRows, _SequentialRows, file_layout, file_sha256, read_file

ROWS, WIDTH, CLASSES = 50, 6, 3


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    return {"train/features/penultimate": rng.normal(size=(ROWS, WIDTH)).astype(np.float32),
            "train/features/linear1": rng.normal(size=(ROWS, 4)).astype(np.float64),
            "train/labels": np.arange(ROWS) % CLASSES,
            "test/features/penultimate": rng.normal(size=(20, WIDTH)).astype(np.float32),
            "test/labels": (np.arange(20) % CLASSES).astype(np.int32),
            "weights": rng.normal(size=(CLASSES, WIDTH)),
            "bias": rng.normal(size=CLASSES)}


def _nested(flat):
    nested = {}
    for key, value in flat.items():
        *groups, name = key.split("/")
        node = nested
        for group in groups:
            node = node.setdefault(group, {})
        node[name] = torch.from_numpy(np.ascontiguousarray(value))
    return nested


def _write(tmp_path, kind, arrays):
    if kind == "npz":
        path = tmp_path / "dump.npz"
        np.savez(path, **arrays)
    elif kind == "npz_compressed":
        path = tmp_path / "dump_compressed.npz"
        np.savez_compressed(path, **arrays)
    elif kind == "safetensors":
        path = tmp_path / "dump.safetensors"
        save_safetensors({key.replace("/", "."): value for key, value in arrays.items()}, path)
    elif kind == "torch_nested":
        path = tmp_path / "dump.pt"
        torch.save(_nested(arrays), path)
    elif kind == "torch_flat":
        path = tmp_path / "dump.pth"
        torch.save({key: torch.from_numpy(value) for key, value in arrays.items()}, path)
    elif kind == "hdf5":
        path = tmp_path / "dump.h5"
        with h5py.File(path, "w") as archive:
            for key, value in arrays.items():
                archive.create_dataset(key, data=value, chunks=True if value.ndim else None)
    return str(path)


FORMATS = ("npz", "npz_compressed", "safetensors", "torch_nested", "torch_flat", "hdf5")


@pytest.mark.parametrize("kind", FORMATS)
def test_every_format_round_trips_into_splits_layers_and_classifier(tmp_path, arrays, kind):
    layout = file_layout(_write(tmp_path, kind, arrays))
    assert set(layout.splits) == {"train", "test"}
    assert set(layout.splits["train"].features) == {"penultimate", "linear1"}
    assert layout.classifier_layer == "penultimate"
    stored = {"train/features/penultimate": layout.splits["train"].features["penultimate"],
              "train/features/linear1": layout.splits["train"].features["linear1"],
              "train/labels": layout.splits["train"].labels,
              "test/features/penultimate": layout.splits["test"].features["penultimate"],
              "test/labels": layout.splits["test"].labels,
              "weights": layout.weights, "bias": layout.bias}
    for key, array in stored.items():
        assert array.shape == arrays[key].shape and array.dtype == str(arrays[key].dtype)
        np.testing.assert_array_equal(array.read(), arrays[key])
        # Row blocks, forwards then backwards (a compressed member reopens its stream).
        blocks = [array.rows(start, start + 7) for start in range(0, array.num_rows, 7)]
        np.testing.assert_array_equal(np.concatenate(blocks), arrays[key])
        np.testing.assert_array_equal(array.rows(1, 3), arrays[key][1:3])
        array.close()


def test_single_array_files_hold_unlabelled_features(tmp_path, arrays):
    features = arrays["train/features/penultimate"]
    np.save(tmp_path / "features.npy", features)
    torch.save(torch.from_numpy(features), tmp_path / "features.pt")
    for name in ("features.npy", "features.pt"):
        layout = file_layout(tmp_path / name)
        split = layout.splits["train"]
        assert split.labels is None
        np.testing.assert_array_equal(split.features["features"].read(), features)


def test_npy_and_npz_are_read_block_by_block(tmp_path, arrays):
    np.save(tmp_path / "features.npy", arrays["train/features/penultimate"])
    (npy,) = read_file(tmp_path / "features.npy").values()
    stored = read_file(_write(tmp_path, "npz", arrays))["train/features/penultimate"]
    for array in (npy, stored):
        assert isinstance(array.rows(0, 1), np.ndarray)
        assert isinstance(array._handle, _MappedRows)
        np.testing.assert_array_equal(array.rows(10, 13),
                                      arrays["train/features/penultimate"][10:13])
    compressed = read_file(_write(tmp_path, "npz_compressed", arrays))["train/labels"]
    compressed.rows(0, 1)
    assert isinstance(compressed._handle, _SequentialRows)


def test_fortran_ordered_npy_is_refused(tmp_path):
    np.save(tmp_path / "fortran.npy", np.asfortranarray(np.ones((4, 3), np.float32)))
    with pytest.raises(ValueError, match="fortran.npy: the array is stored Fortran-ordered"):
        read_file(tmp_path / "fortran.npy")


def test_bfloat16_tensors_are_read_as_float32(tmp_path):
    values = torch.arange(12, dtype=torch.float32).reshape(4, 3).to(torch.bfloat16)
    save_torch_safetensors({"features": values}, tmp_path / "half.safetensors")
    torch.save({"features": values}, tmp_path / "half.pt")
    for name in ("half.safetensors", "half.pt"):
        (array,) = read_file(tmp_path / name).values()
        assert array.dtype == "bfloat16" and array.is_float
        block = array.rows(1, 3)
        assert block.dtype == np.float32
        np.testing.assert_array_equal(block, values[1:3].float().numpy())


@pytest.mark.parametrize("kind", ["npz", "safetensors", "torch_flat", "hdf5"])
def test_truncated_files_fail_naming_the_file(tmp_path, arrays, kind):
    path = _write(tmp_path, kind, arrays)
    with open(path, "r+b") as stream:
        stream.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match=os.path.basename(path)):
        layout = file_layout(path)
        for split in layout.splits.values():  # formats that open lazily fail on reading
            for features in split.features.values():
                features.read()


def test_truncated_npy_fails_naming_the_file(tmp_path, arrays):
    path = tmp_path / "features.npy"
    np.save(path, arrays["train/features/penultimate"])
    with open(path, "r+b") as stream:
        stream.truncate(200)
    with pytest.raises(ValueError, match="features.npy"):
        read_file(path)


def test_garbage_and_unknown_files_fail_naming_the_file(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a torch file at all")
    (tmp_path / "junk.npz").write_bytes(b"PK not a zip")
    (tmp_path / "notes.txt").write_text("hello")
    for name in ("junk.pt", "junk.npz"):
        with pytest.raises(ValueError, match=name):
            read_file(tmp_path / name)
    with pytest.raises(ValueError, match=r"notes\.txt.*unknown file type"):
        read_file(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="missing.npy: no such file"):
        read_file(tmp_path / "missing.npy")


def test_files_without_features_say_how_to_name_arrays(tmp_path):
    np.savez(tmp_path / "other.npz", embeddings=np.zeros((3, 2)), y=np.zeros(3, int))
    with pytest.raises(ValueError, match=r"other.npz: found no features.*'embeddings'"):
        file_layout(tmp_path / "other.npz")


def test_sha256_matches_hashlib_and_reports_bytes(tmp_path):
    import hashlib

    data = os.urandom(100_000)
    (tmp_path / "blob.bin").write_bytes(data)
    seen = []
    assert file_sha256(tmp_path / "blob.bin", seen.append) == hashlib.sha256(data).hexdigest()
    assert sum(seen) == len(data)


def test_stored_npz_members_are_not_deflated(tmp_path, arrays):
    """The premise of memory-mapping np.savez archives."""
    with zipfile.ZipFile(_write(tmp_path, "npz", arrays)) as archive:
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}


@pytest.mark.parametrize("kind", FORMATS)
def test_every_format_analyses_like_the_arrays_it_holds(tmp_path, arrays, kind):
    from ncfast import collapse
    from ncfast.analyze import analyze

    analysis = analyze([_write(tmp_path, kind, arrays)], progress=False, use_cache=False)
    assert analysis.failures == []
    rows = {(row["split"], row["layer"]): row for row in analysis.rows}
    assert set(rows) == {("train", "penultimate"), ("train", "linear1"),
                         ("test", "penultimate")}
    classifier = {"weights": arrays["weights"], "bias": arrays["bias"]}
    train = collapse(arrays["train/features/penultimate"], arrays["train/labels"], **classifier)
    test = collapse(arrays["test/features/penultimate"], arrays["test/labels"], means=train,
                    **classifier)
    linear1 = collapse(arrays["train/features/linear1"], arrays["train/labels"])
    for key, report in ((("train", "penultimate"), train), (("test", "penultimate"), test),
                        (("train", "linear1"), linear1)):
        for name, value in report.metrics().items():
            assert rows[key][name] == pytest.approx(value, rel=1e-9), (key, name)
