"""Readers: every format round-trips, streams in row blocks, and fails with the file's name."""
import errno
import io
import os
import pickle
import subprocess
import sys
import zipfile

import h5py
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_safetensors
from safetensors.torch import save_file as save_torch_safetensors

from ncfast import readers
from ncfast.readers import (_MappedRows, _member_data_offset, _SequentialRows, file_layout,
                            file_sha256, read_file)

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


def test_fortran_ordered_npz_member_is_refused(tmp_path):
    """Read in C order, its rows would be scrambled."""
    np.savez(tmp_path / "dump.npz", features=np.asfortranarray(np.arange(12.0).reshape(4, 3)),
             labels=np.arange(4) % 2)
    with pytest.raises(ValueError, match=r"dump.npz \[features\]: the array is Fortran-ordered"):
        read_file(tmp_path / "dump.npz")


def test_weights_that_fit_two_layers_are_refused(tmp_path):
    """Which layer the classifier reads would be a guess."""
    np.savez(tmp_path / "dump.npz", **{"features/a": np.ones((6, 4), np.float32),
                                       "features/b": np.ones((6, 4), np.float32),
                                       "labels": np.arange(6) % 3, "weights": np.ones((3, 4))})
    with pytest.raises(ValueError, match=r"weights of shape \(3, 4\) match layers a, b"):
        file_layout(tmp_path / "dump.npz")


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


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2,
                                   torch.float8_e5m2fnuz, torch.float8_e8m0fnu])
def test_float8_tensors_are_read_as_float32(tmp_path, dtype):
    """They were refused: "features must be floating point; found float8_e5m2"."""
    values = torch.arange(1, 13, dtype=torch.float32).reshape(4, 3).to(dtype)
    save_torch_safetensors({"features": values}, tmp_path / "eighth.safetensors")
    torch.save({"features": values}, tmp_path / "eighth.pt")
    for name in ("eighth.safetensors", "eighth.pt"):
        (array,) = read_file(tmp_path / name).values()
        assert array.dtype == str(dtype).removeprefix("torch.") and array.is_float
        assert array.nbytes == 12
        block = array.rows(1, 3)
        assert block.dtype == np.float32
        np.testing.assert_array_equal(block, values[1:3].float().numpy())


def test_torch_parameters_and_lazily_negated_tensors_are_read_as_their_values(tmp_path):
    layer = torch.nn.Linear(WIDTH, CLASSES)  # parameters require grad
    complex_values = torch.randn(4, 3, dtype=torch.complex64)
    negated = torch.randn(4, 3, dtype=torch.complex64).conj().imag  # the negative bit set
    torch.save({"weights": layer.weight, "bias": layer.bias, "negated": negated,
                "conjugated": complex_values.conj()}, tmp_path / "model.pt")
    stored = read_file(tmp_path / "model.pt")
    for key, values in (("weights", layer.weight), ("bias", layer.bias), ("negated", negated),
                        ("conjugated", complex_values.conj())):
        np.testing.assert_array_equal(stored[key].rows(0, 2),
                                      values[:2].detach().resolve_conj().resolve_neg().numpy())


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


def test_corrupt_stored_npz_member_fails_naming_it(tmp_path):
    labels = np.arange(3000) % CLASSES  # 24 kB: past zipfile's 4 KiB read-ahead, which checks
    np.savez(tmp_path / "corrupt.npz", features=np.ones((3000, 2), np.float32), labels=labels)
    with zipfile.ZipFile(tmp_path / "corrupt.npz") as archive:
        info = archive.getinfo("labels.npy")
    member_end = _member_data_offset(tmp_path / "corrupt.npz", info) + info.file_size
    with open(tmp_path / "corrupt.npz", "r+b") as stream:
        stream.seek(member_end - 8 * (3000 - 2000))  # labels[2000]: 2 -> 0, still a class
        stream.write(b"\x00")
    stored = read_file(tmp_path / "corrupt.npz")["labels"]
    corrupt = r"corrupt.npz \[labels\]: .* CRC-32 .*: the file is corrupt"
    with pytest.raises(ValueError, match=corrupt):
        for start in range(0, 3000, 700):
            stored.rows(start, start + 700)
    with pytest.raises(ValueError, match=corrupt):  # the member stays refused
        stored.rows(0, 10)
    stored.close()
    with pytest.raises(ValueError, match=corrupt):
        stored.read()
    np.testing.assert_array_equal(read_file(tmp_path / "corrupt.npz")["features"].read(), 1)

    from ncfast.analyze import analyze

    analysis = analyze([tmp_path / "corrupt.npz"], progress=False, use_cache=False)
    assert analysis.rows == [] and "the file is corrupt" in analysis.failures[0].reason


def _npy_bytes_claiming(num_rows, rows):
    """A .npy file's bytes whose header promises ``num_rows`` rows but which holds ``rows``."""
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {
        "descr": np.lib.format.dtype_to_descr(rows.dtype), "fortran_order": False,
        "shape": (num_rows, *rows.shape[1:])})
    return stream.getvalue() + rows.tobytes()


@pytest.mark.parametrize("compression, reason", [
    (zipfile.ZIP_STORED, r"the file has \d+ bytes; its header promises \d+"),
    (zipfile.ZIP_DEFLATED, "member 'features.npy' ends early")], ids=["stored", "deflated"])
def test_npz_member_shorter_than_its_header_is_refused(tmp_path, compression, reason):
    """A member that holds 5 of the 1000 rows its header promises: an error naming it and
    the reason, not fewer rows (deflated) or an internal error (stored)."""
    with zipfile.ZipFile(tmp_path / "short.npz", "w", compression) as archive:
        archive.writestr("features.npy",
                         _npy_bytes_claiming(1000, np.ones((5, 3), np.float32)))
    stored = read_file(tmp_path / "short.npz")["features"]
    assert stored.shape == (1000, 3)
    with pytest.raises(ValueError, match=r"short.npz \[features\]: cannot read rows 0:1000 "
                                         rf"\(EOFError: {reason}\)"):
        stored.read()


def test_npy_cut_after_it_was_opened_says_what_its_header_promises(tmp_path):
    np.save(tmp_path / "features.npy", np.ones((100, 4), np.float32))
    stored = read_file(tmp_path / "features.npy")[None]
    os.truncate(tmp_path / "features.npy", os.path.getsize(tmp_path / "features.npy") - 16)
    with pytest.raises(ValueError, match=r"features.npy: cannot read rows 0:10 \(EOFError: the "
                                         r"file has \d+ bytes; its header promises \d+\)"):
        stored.rows(0, 10)


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


def test_paths_that_cannot_be_opened_say_why(tmp_path, monkeypatch):
    (tmp_path / "labels_dir").mkdir()
    with pytest.raises(ValueError, match="labels_dir: is a directory, not a file"):
        read_file(tmp_path / "labels_dir")
    np.save(tmp_path / "locked.npy", np.zeros(3))

    def refuse(path, *args):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    monkeypatch.setattr(readers, "open", refuse, raising=False)  # as if run without root
    with pytest.raises(ValueError, match="locked.npy: permission denied; make the file") as error:
        read_file(tmp_path / "locked.npy")
    assert "corrupt" not in str(error.value)


def test_running_out_of_memory_is_not_called_a_corrupt_file(tmp_path, monkeypatch):
    np.save(tmp_path / "large.npy", np.zeros((4, 2), np.float32))

    def out_of_memory(path):
        raise MemoryError("Unable to allocate 8.00 TiB")

    monkeypatch.setitem(readers._READERS, "npy", out_of_memory)
    with pytest.raises(MemoryError, match="8.00 TiB"):
        read_file(tmp_path / "large.npy")


def test_torch_files_of_other_objects_are_refused_in_one_line(tmp_path):
    torch.save({"features": np.zeros((4, 3), np.float32)}, tmp_path / "numpy.pt")
    with pytest.raises(ValueError, match=r"numpy.pt: holds objects other than tensors "
                                         r"\(numpy\..*weights_only=True") as error:
        read_file(tmp_path / "numpy.pt")
    message = str(error.value)
    assert "torch.from_numpy" in message and "\n" not in message and "\x1b" not in message
    assert "weights_only=False" not in message and "corrupt" not in message
    torch.save({"features": torch.eye(3).to_sparse()}, tmp_path / "sparse.pt")
    with pytest.raises(ValueError, match=r"sparse.pt \[features\]: is a torch.sparse_coo tensor"):
        read_file(tmp_path / "sparse.pt")


@pytest.mark.parametrize("protocol", [2, 4])
def test_only_torch_legacy_files_are_said_to_be_in_the_legacy_format(tmp_path, protocol):
    """Random bytes, text or a plain pickle named .pt were said to be in torch's legacy
    format (torch.load says the same of every file that is not a zip archive)."""
    values = {"features": torch.ones(4, 3)}
    torch.save(values, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False,
               pickle_protocol=protocol)
    with pytest.raises(ValueError, match="legacy.pt: saved in torch's legacy format"):
        read_file(tmp_path / "legacy.pt")
    (tmp_path / "random_epoch1.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "text.pt").write_text("features\n" * 10)
    (tmp_path / "pickle.pt").write_bytes(pickle.dumps(values, protocol))
    for name in ("random_epoch1.pt", "text.pt", "pickle.pt"):
        with pytest.raises(ValueError) as error:
            read_file(tmp_path / name)
        assert str(error.value) == (
            f"{tmp_path / name}: not a torch file (neither the zip archive torch.save writes nor "
            "torch's legacy format); it may be corrupt or of another format: re-save it with "
            "torch.save")


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


@pytest.mark.parametrize("kind", ["npz", "npz_compressed", "hdf5"])
def test_big_endian_arrays_analyse_like_native_ones(tmp_path, arrays, kind):
    from ncfast.analyze import analyze

    swapped = {key: value.astype(value.dtype.newbyteorder(">")) for key, value in arrays.items()}
    (tmp_path / "big").mkdir()
    stored = file_layout(_write(tmp_path / "big", kind, swapped))
    assert stored.splits["train"].labels.is_integer and stored.weights.is_float
    native, big = (analyze([_write(folder, kind, values)], progress=False, use_cache=False)
                   for folder, values in ((tmp_path, arrays), (tmp_path / "big", swapped)))
    assert big.failures == [] and len(big.rows) == len(native.rows) == 3
    for native_row, big_row in zip(native.rows, big.rows):
        assert {key: value for key, value in big_row.items() if key != "source"} == \
            {key: value for key, value in native_row.items() if key != "source"}


@pytest.mark.parametrize("keys, named", [
    (("features", "train/features"), "the train split's features"),
    (("features/a.b", "features/a/b"), "the train split's features of layer 'a.b'"),
    (("labels", "train/labels"), "the train split's labels"),
    (("test.clean_labels", "test/clean_labels"), "the test split's clean labels"),
], ids=["features", "layer", "labels", "clean_labels"])
def test_keys_naming_the_same_array_are_refused(tmp_path, keys, named):
    """One of the two replaced the other without a word."""
    first, second = keys
    arrays = {"features": np.ones((4, 2), np.float32), "labels": np.arange(4), first: np.zeros(4),
              second: np.ones(4)}
    np.savez(tmp_path / "twice.npz", **arrays)
    with pytest.raises(ValueError, match=f"twice.npz: keys '{first}' and '{second}' both name "
                                         f"{named}; keep one"):
        file_layout(tmp_path / "twice.npz")


@pytest.mark.parametrize("keys, refused", [
    (("fc/weights", "head/weights"), "key 'fc/weights' names the classifier's weights"),
    (("test/weights",), "key 'test/weights' names the classifier's weights"),
    (("train.bias",), "key 'train.bias' names the classifier's bias"),
    (("weights/fc",), "key 'weights/fc' names the classifier's weights"),
    (("weights", "/weights"), "keys 'weights' and '/weights' both name the classifier's weights"),
    (("labels/noisy",), "key 'labels/noisy' has parts after 'labels'.* rename it 'labels'"),
], ids=["two_heads", "split_prefix", "train_prefix", "suffix", "twice", "labels_suffix"])
def test_classifier_keys_other_than_weights_and_bias_are_refused(tmp_path, keys, refused):
    """Several classifiers, or one under a split's name, were read as the file's one."""
    arrays = {"features": np.ones((4, 2), np.float32), "labels": np.arange(4),
              **{key: np.eye(3, 2) for key in keys}}
    np.savez(tmp_path / "heads.npz", **arrays)
    with pytest.raises(ValueError, match=f"heads.npz: {refused}"):
        file_layout(tmp_path / "heads.npz")


@pytest.mark.parametrize("value, key, found", [
    ([torch.arange(4)], "clean_labels", "list"),
    ((torch.eye(3, 2),), "weights", "tuple"),
    ([0.5, 0.25], "history", "list"),
    (3, "train/labels", "int"),
], ids=["list_of_tensors", "tuple", "list_elsewhere", "number_as_labels"])
def test_torch_values_other_than_tensors_are_refused(tmp_path, value, key, found):
    """They were dropped: the metrics they feed were left out without a word."""
    features, labels = torch.ones(4, 2), torch.arange(4)
    torch.save({"features": features, "labels": labels, key: value}, tmp_path / "lists.pt")
    with pytest.raises(ValueError, match=fr"lists.pt \[{key}\]: is a {found}, not a tensor; .*"
                                         r"torch.stack"):
        read_file(tmp_path / "lists.pt")
    torch.save({"features": features, "labels": labels, "epoch": 5, "name": "run"},
               tmp_path / "scalars.pt")
    assert set(read_file(tmp_path / "scalars.pt")) == {"features", "labels"}


def test_named_pipes_are_refused_before_opening(tmp_path, fail_instead_of_hanging):
    """Opening one waited forever for a writer."""
    os.mkfifo(tmp_path / "pipe.npy")
    os.symlink(tmp_path / "pipe.npy", tmp_path / "link.npz")
    for name in ("pipe.npy", "link.npz"):
        with pytest.raises(ValueError, match=f"{name}: is a named pipe \\(FIFO\\), not a regular "
                                             "file"):
            file_layout(tmp_path / name)
    np.save(tmp_path / "features.npy", np.ones((4, 2), np.float32))
    os.symlink(tmp_path / "features.npy", tmp_path / "linked.npy")
    (array,) = read_file(tmp_path / "linked.npy").values()
    np.testing.assert_array_equal(array.read(), 1)
    os.replace(tmp_path / "pipe.npy", tmp_path / "features.npy")  # after read_file, before rows
    with pytest.raises(ValueError, match="linked.npy: is a named pipe"):
        array.rows(0, 2)


def test_npy_cut_short_while_read_is_an_error_not_a_crash(tmp_path):
    """Touching the mapped pages past the new end killed the process (SIGBUS).

    The blocks are not touched here: without the check the test fails instead of crashing.
    """
    np.save(tmp_path / "features.npy", np.ones((100_000, 4), np.float32))
    (array,) = read_file(tmp_path / "features.npy").values()
    array.rows(0, 1000)
    os.truncate(tmp_path / "features.npy", 4096)
    with pytest.raises(ValueError, match=r"features.npy: became shorter while being read \(4096 "
                                         r"bytes, the header needs 1600128\): was it rewritten"):
        array.rows(50_000, 51_000)
    array.close()


def test_damaged_files_are_told_in_one_printable_line(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.pt: is empty \(0 bytes\)"):
        read_file(tmp_path / "empty.pt")
    rng = np.random.default_rng(0)  # cut at half, torch's zip reader fails with EINVAL
    torch.save({"features": torch.from_numpy(rng.normal(size=(400, 16)).astype(np.float32)),
                "labels": torch.from_numpy(rng.integers(0, 4, 400))}, tmp_path / "half.pt")
    os.truncate(tmp_path / "half.pt", os.path.getsize(tmp_path / "half.pt") // 2)
    with pytest.raises(ValueError, match="half.pt: not a readable torch file .* truncated or "
                                         "corrupt") as error:
        read_file(tmp_path / "half.pt")
    assert "file system" not in str(error.value)
    np.savez(tmp_path / "archive.npz", features=np.ones((4, 2), np.float32))
    os.rename(tmp_path / "archive.npz", tmp_path / "archive.npy")
    with pytest.raises(ValueError, match="archive.npy' is a .npz archive .* rename it with the "
                                         ".npz suffix, which `ncfast analyze` reads"):
        read_file(tmp_path / "archive.npy")
    np.save(tmp_path / "flipped.npy", np.ones((4, 2), np.float32))
    header = bytearray((tmp_path / "flipped.npy").read_bytes())
    header[20] ^= 0xFF  # the descr's opening quote
    (tmp_path / "flipped.npy").write_bytes(header)
    with pytest.raises(ValueError, match="flipped.npy' is not a readable .npy") as error:
        read_file(tmp_path / "flipped.npy")
    message = str(error.value)
    assert message.isascii() and message.isprintable() and "  " not in message


CUT_WHILE_READ = """
import os, sys
import numpy as np
from ncfast.readers import read_file
path = sys.argv[1]
arrays = read_file(path)
for array in arrays.values():
    array.rows(0, 10)
os.truncate(path, 4096)
for array in arrays.values():
    try:
        array.rows(20_000, 30_000).sum()
    except ValueError as error:
        print(error)
"""


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_file_cut_short_while_read_is_an_error_not_a_crash(tmp_path, suffix):
    """safetensors and torch map the file themselves: a block past the new end killed the
    process (SIGBUS), here a subprocess, as ``.npy`` did before its check."""
    features = np.ones((40_000, 16), np.float32)
    path = tmp_path / f"rows{suffix}"
    if suffix == ".pt":
        torch.save({"features": torch.from_numpy(features)}, path)
    else:
        save_safetensors({"features": features}, str(path))
    done = subprocess.run([sys.executable, "-c", CUT_WHILE_READ, str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{path} [features]: became shorter while being read (4096 "
                                  "bytes, it had when opened ")


def _npy_with_header_of(num_bytes):
    """A float32 (200, 8) .npy file's bytes with its header padded to ``num_bytes``."""
    text = "{'descr': '<f4', 'fortran_order': False, 'shape': (200, 8), }"
    header = text + " " * (num_bytes - len(text) - 11) + "\n"
    return (b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode()
            + np.zeros((200, 8), np.float32).tobytes())


def test_a_npy_header_too_large_to_read_safely_is_named_as_such(tmp_path):
    """It was said to hold pickled objects (.npy), or numpy's advice to load it with
    allow_pickle=True was passed on (.npz)."""
    path = tmp_path / "large.npy"
    path.write_bytes(_npy_with_header_of(20_000))
    with pytest.raises(ValueError, match=r"large.npy' has a .npy header larger than numpy "
                                         r"reads without trusting the file"):
        read_file(path)
    with zipfile.ZipFile(tmp_path / "large.npz", "w") as archive:
        archive.writestr("features.npy", _npy_with_header_of(20_000))
    with pytest.raises(ValueError, match=r"large.npz \[features\]: has a .npy header larger") \
            as refused:
        read_file(tmp_path / "large.npz")
    assert "allow_pickle" not in str(refused.value)
