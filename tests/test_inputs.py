"""Every accepted input form gives the report of a plain float32 numpy array.

Where the rows reach the kernels as the same float32 values in the same
chunks (memory maps, ``.npy`` paths, torch tensors, other layouts, byte
orders and label dtypes), the report must be identical. Half-precision rows
are compared with the report of their float32 upcast.
"""
import os
import tracemalloc

import numpy as np
import pytest
import torch

import ncfast
from cases import gaussian_classes, with_label_noise

#: Rows per chunk in these tests; the inputs have several chunks.
CHUNK_SIZE = 64


@pytest.fixture(scope="module")
def case():
    """600 rows of 24 float32 features in 5 classes, with a classifier and noisy labels."""
    return with_label_noise(gaussian_classes(num_rows=600, num_features=24, num_classes=5))


def chunked_collapse(features, labels, case, **options):
    """``ncfast.collapse`` with the case's classifier, in ``CHUNK_SIZE`` chunks."""
    return ncfast.collapse(features, labels, weights=case["weights"], bias=case["bias"],
                           chunk_size=CHUNK_SIZE, **options)


@pytest.fixture(scope="module")
def reference(case):
    """The report of the plain C-contiguous float32 array and int64 labels."""
    return chunked_collapse(case["features"], case["labels"], case)


#: Rows per chunk for ``large_case``: its chunks are a small fraction of it.
LARGE_CHUNK_SIZE = 1024


@pytest.fixture(scope="module")
def large_case():
    """40,000 rows of 32 float32 features (5 MB) in 10 classes."""
    return gaussian_classes(num_rows=40_000, num_features=32, num_classes=10, classifier=False)


def peak_traced_bytes(function):
    """Peak bytes allocated through Python and numpy while ``function()`` runs."""
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --- files and memory maps ------------------------------------------------------------------

def test_memmap(case, reference, tmp_path, assert_same_report):
    path = tmp_path / "features.f32"
    case["features"].tofile(path)
    features = np.memmap(path, dtype=np.float32, mode="r", shape=case["features"].shape)
    assert_same_report(chunked_collapse(features, case["labels"], case), reference, rtol=0)


def test_npy_memmap(case, reference, tmp_path, assert_same_report):
    path = tmp_path / "features.npy"
    np.save(path, case["features"])
    features = np.load(path, mmap_mode="r")
    assert_same_report(chunked_collapse(features, case["labels"], case), reference, rtol=0)


@pytest.mark.parametrize("as_text", [False, True])
def test_npy_paths(case, reference, tmp_path, as_text, assert_same_report):
    features_path, labels_path = tmp_path / "features.npy", tmp_path / "labels.npy"
    np.save(features_path, case["features"])
    np.save(labels_path, case["labels"])
    if as_text:
        features_path, labels_path = str(features_path), str(labels_path)
    assert_same_report(chunked_collapse(features_path, labels_path, case), reference, rtol=0)


def test_npy_path_is_read_in_chunks(large_case, tmp_path):
    """Collapsing a 5 MB ``.npy`` file allocates a small fraction of it, and reads it all."""
    path = tmp_path / "features.npy"
    np.save(path, large_case["features"])
    file_bytes = path.stat().st_size
    labels = large_case["labels"]
    # Compiled kernels load on their first call (bookkeeping of their own, not the data's).
    ncfast.collapse(path, labels, chunk_size=LARGE_CHUNK_SIZE)
    peak = peak_traced_bytes(lambda: ncfast.collapse(path, labels, chunk_size=LARGE_CHUNK_SIZE))
    assert peak < file_bytes / 4, f"peak {peak} bytes while reading a {file_bytes}-byte file"
    in_memory = ncfast.collapse(large_case["features"], labels, chunk_size=LARGE_CHUNK_SIZE)
    assert ncfast.collapse(path, labels, chunk_size=LARGE_CHUNK_SIZE).to_dict() == \
        in_memory.to_dict()



def test_npy_paths_that_are_not_regular_files_are_refused_before_opening(
        case, tmp_path, fail_instead_of_hanging):
    """Opening a named pipe waited forever for a writer."""
    os.mkfifo(tmp_path / "pipe.npy")
    with pytest.raises(ValueError, match=r"features file .*pipe.npy' is a named pipe \(FIFO\), "
                                         "not a regular file"):
        ncfast.collapse(tmp_path / "pipe.npy", case["labels"])
    np.save(tmp_path / "labels.npy", case["labels"])
    os.symlink(tmp_path / "pipe.npy", tmp_path / "linked.npy")
    with pytest.raises(ValueError, match="labels file .*linked.npy' is a named pipe"):
        ncfast.collapse(case["features"], tmp_path / "linked.npy")
    (tmp_path / "folder.npy").mkdir()
    with pytest.raises(ValueError, match="folder.npy' is a directory, not a file"):
        ncfast.collapse(tmp_path / "folder.npy", case["labels"])
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.npy' is empty \(0 bytes\)"):
        ncfast.collapse(tmp_path / "empty.npy", case["labels"])


def test_npz_archive_named_npy_is_told_to_be_renamed(case, tmp_path):
    """It was told to use ``ncfast analyze``, which reads a .npy name as a .npy file."""
    np.savez(tmp_path / "archive.npz", features=case["features"])
    os.rename(tmp_path / "archive.npz", tmp_path / "archive.npy")
    with pytest.raises(ValueError, match=r"archive.npy' is a .npz archive of arrays \(features\), "
                                         "not one .npy array: rename it with the .npz suffix"):
        ncfast.collapse(tmp_path / "archive.npy", case["labels"])


def test_npz_archive_path_is_told_to_pass_one_of_its_arrays(case, tmp_path):
    """It was told to rename the file with the .npz suffix, which it had."""
    np.savez(tmp_path / "archive.npz", labels=case["labels"], features=case["features"])
    for what, inputs in (("features", (tmp_path / "archive.npz", case["labels"])),
                         ("labels", (case["features"], str(tmp_path / "archive.npz")))):
        with pytest.raises(ValueError) as raised:
            ncfast.collapse(*inputs)
        assert str(raised.value).endswith(
            "archive.npz' is a .npz archive of arrays (labels, features), not one .npy array; "
            "in Python, ncfast takes the path of a .npy file or an array: pass one of its "
            f"arrays, np.load(path)[{what!r}], or read the archive with `ncfast analyze`")
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(ValueError, match=r"empty.npz' is an empty .npz archive \(no arrays\)"):
        ncfast.collapse(tmp_path / "empty.npz", case["labels"])


# --- torch ----------------------------------------------------------------------------------

def test_torch_float32_tensor(case, reference, assert_same_report):
    features = torch.from_numpy(case["features"].copy())
    assert_same_report(chunked_collapse(features, torch.from_numpy(case["labels"]), case), reference,
                       rtol=0)


def test_torch_tensor_is_not_copied(large_case):
    """Collapsing a 5 MB tensor allocates a small fraction of it through numpy."""
    features = torch.from_numpy(large_case["features"])
    peak = peak_traced_bytes(lambda: ncfast.collapse(features, large_case["labels"],
                                                     chunk_size=LARGE_CHUNK_SIZE))
    tensor_bytes = features.numel() * features.element_size()
    assert peak < tensor_bytes / 4, f"peak {peak} bytes for a {tensor_bytes}-byte tensor"


def test_torch_tensor_that_requires_grad(case, reference, assert_same_report):
    features = torch.tensor(case["features"], requires_grad=True)
    weights = torch.tensor(case["weights"], requires_grad=True)
    report = ncfast.collapse(features, case["labels"], weights=weights, bias=case["bias"],
                             chunk_size=CHUNK_SIZE)
    assert_same_report(report, reference, rtol=0)
    assert features.grad is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_half_tensors_are_upcast(case, dtype, assert_same_report):
    features = torch.from_numpy(case["features"]).to(dtype)
    upcast = features.float().numpy()
    assert_same_report(chunked_collapse(features, case["labels"], case),
                       chunked_collapse(upcast, case["labels"], case), rtol=0)


def test_numpy_float16_is_upcast(case, assert_same_report):
    features = case["features"].astype(np.float16)
    assert_same_report(chunked_collapse(features, case["labels"], case),
                       chunked_collapse(features.astype(np.float32), case["labels"], case), rtol=0)


# --- labels ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32,
                                   np.int64, np.uint64])
def test_label_dtypes(case, reference, dtype, assert_same_report):
    assert_same_report(chunked_collapse(case["features"], case["labels"].astype(dtype), case),
                       reference, rtol=0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_torch_label_dtypes(case, reference, dtype, assert_same_report):
    labels = torch.from_numpy(case["labels"]).to(dtype)
    assert_same_report(chunked_collapse(case["features"], labels, case), reference, rtol=0)


def test_big_endian_labels(case, reference, assert_same_report):
    assert_same_report(chunked_collapse(case["features"], case["labels"].astype(">i4"), case),
                       reference, rtol=0)


# --- layouts and byte orders ----------------------------------------------------------------

def test_transposed_view(case, reference, assert_same_report):
    features = np.ascontiguousarray(case["features"].T).T
    assert not features.flags.c_contiguous
    assert_same_report(chunked_collapse(features, case["labels"], case), reference, rtol=0)


def test_strided_views(case, reference, assert_same_report):
    """Every other column of a wider array and every other row of a taller one."""
    wide = np.repeat(case["features"], 2, axis=1)[:, ::2]
    tall = np.repeat(case["features"], 2, axis=0)[::2]
    for features in (wide, tall):
        assert not features.flags.c_contiguous
        assert_same_report(chunked_collapse(features, case["labels"], case), reference, rtol=0)


def test_fortran_ordered_array(case, reference, assert_same_report):
    features = np.asfortranarray(case["features"])
    assert features.flags.f_contiguous and not features.flags.c_contiguous
    assert_same_report(chunked_collapse(features, case["labels"], case), reference, rtol=0)


@pytest.mark.parametrize("dtype", [">f4", ">f8"])
def test_big_endian_features(case, dtype, assert_same_report):
    features = case["features"].astype(dtype)
    native = features.astype(features.dtype.newbyteorder("="))
    assert_same_report(chunked_collapse(features, case["labels"], case),
                       chunked_collapse(native, case["labels"], case), rtol=0)


# --- chunk sources --------------------------------------------------------------------------

#: Uneven chunk boundaries on multiples of ``CHUNK_SIZE``, so that the source is
#: split into the same ``CHUNK_SIZE``-row chunks as the whole array.
BOUNDARIES = [0, 64, 256, 320, 600]


def chunk_tuples(*columns):
    return [tuple(column[start:stop] for column in columns)
            for start, stop in zip(BOUNDARIES, BOUNDARIES[1:])]


def test_list_of_chunk_tuples(case, reference, assert_same_report):
    chunks = chunk_tuples(case["features"], case["labels"])
    assert len({len(labels) for _, labels in chunks}) > 1
    report = chunked_collapse(chunks, None, case, num_classes=case["num_classes"])
    assert_same_report(report, reference, rtol=0)


def test_chunk_source_with_an_empty_chunk(case, reference, assert_same_report):
    """A chunk without rows (a filter that kept none, an empty file) adds nothing."""
    chunks = chunk_tuples(case["features"], case["labels"])
    chunks.insert(2, (case["features"][:0], case["labels"][:0]))
    report = chunked_collapse(chunks, None, case, num_classes=case["num_classes"])
    assert_same_report(report, reference, rtol=0)


def test_list_of_torch_chunk_tuples(case, reference, assert_same_report):
    chunks = chunk_tuples(torch.from_numpy(case["features"]), torch.from_numpy(case["labels"]))
    report = chunked_collapse(chunks, None, case, num_classes=case["num_classes"])
    assert_same_report(report, reference, rtol=0)


def test_chunk_tuples_with_clean_labels(case, assert_same_report):
    chunks = chunk_tuples(case["features"], case["labels"], case["clean_labels"])
    report = chunked_collapse(chunks, None, case, num_classes=case["num_classes"])
    assert report.memorization is not None
    assert_same_report(report, chunked_collapse(case["features"], case["labels"], case,
                                        clean_labels=case["clean_labels"]), rtol=0)


class NpyChunkFiles:
    """A re-iterable chunk source: one pair of ``.npy`` files per chunk, read when iterated."""

    def __init__(self, folder, features, labels):
        self.paths = []
        for index, (feature_chunk, label_chunk) in enumerate(chunk_tuples(features, labels)):
            pair = folder / f"features_{index}.npy", folder / f"labels_{index}.npy"
            np.save(pair[0], feature_chunk)
            np.save(pair[1], label_chunk)
            self.paths.append(pair)
        self.times_iterated = 0

    def __iter__(self):
        self.times_iterated += 1
        for features_path, labels_path in self.paths:
            yield np.load(features_path), np.load(labels_path)


def test_re_iterable_chunk_source(case, reference, tmp_path, assert_same_report):
    source = NpyChunkFiles(tmp_path, case["features"], case["labels"])
    report = chunked_collapse(source, None, case, num_classes=case["num_classes"])
    assert_same_report(report, reference, rtol=0)
    assert source.times_iterated >= 2


def test_reports_compare_by_value():
    """``==`` raised on the report's arrays; now equal fields (NaN equal to NaN) make equal
    reports, and a pickled copy equals its original."""
    import pickle

    case = gaussian_classes(num_rows=300, num_features=8, num_classes=4, classifier=False)
    report = ncfast.collapse(case["features"], case["labels"])
    assert report == pickle.loads(pickle.dumps(report))
    assert report == ncfast.collapse(case["features"].copy(), case["labels"].copy())
    assert report != ncfast.collapse(case["features"][:-1], case["labels"][:-1])
    assert report != report.to_dict()
