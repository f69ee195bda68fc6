"""``ncfast.dask.collapse`` equals ``ncfast.collapse`` on the same rows (issue 7).

The cluster tests run on a 2-worker ``LocalCluster`` of processes, so the
block tasks, the tree of merges and the broadcast of the class means really
cross process boundaries; one test kills a worker in the middle of a pass.

Blocks are uneven (and one is empty) but start on multiples of ``chunk_size``,
so every kernel call sees the same rows as in the single-process run and the
reports differ only by the order of the float64 sums (<= 1e-10 relative).
Blocks that cut the chunk grid elsewhere change which rows share a float32
GEMM call, and BLAS rounds a row's products differently with the call's
shape: ``test_blocks_off_the_chunk_grid`` states that bound.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
cloudpickle = pytest.importorskip("cloudpickle")

import ncfast  # noqa: E402
import ncfast.dask  # noqa: E402
from cases import ADVERSARIAL, gaussian_classes, with_label_noise  # noqa: E402

CHUNK_SIZE = 16

#: Keywords of ``collapse`` that a case may carry besides its rows.
OPTIONS = ("num_classes", "weights", "bias", "clean_labels")


def uneven_row_chunks(num_rows, seed):
    """Row block sizes: uneven multiples of CHUNK_SIZE, an empty block, the rest last."""
    rng = np.random.default_rng(seed)
    largest = max(1, num_rows // (4 * CHUNK_SIZE))
    sizes = [0]
    while sum(sizes) + largest * CHUNK_SIZE < num_rows:
        sizes.append(CHUNK_SIZE * int(rng.integers(1, largest + 1)))
    return tuple(rng.permutation(sizes).tolist()) + (num_rows - sum(sizes),)


def as_dask(case, row_chunks):
    """The case's features as a dask array of the given row blocks, labels as numpy."""
    features = da.from_array(case["features"], chunks=(row_chunks, case["features"].shape[1]))
    options = {name: case[name] for name in OPTIONS if name in case}
    return features, case["labels"], options


def single_process_report(case, **extra):
    options = {name: case[name] for name in OPTIONS if name in case}
    return ncfast.collapse(case["features"], case["labels"], chunk_size=CHUNK_SIZE, **options,
                           **extra)


@pytest.fixture(scope="module")
def client():
    """A 2-worker LocalCluster of processes (nannies restart killed workers)."""
    # Functions defined here run on the workers: ship them by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as cluster_client:
        yield cluster_client
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.mark.parametrize("noise", [False, True], ids=["clean", "noisy"])
@pytest.mark.parametrize("name", ADVERSARIAL)
def test_threads_equal_single_process(name, noise, assert_same_report):
    """Every adversarial case; no client, so the blocks run on Dask's threads at once."""
    case = gaussian_classes(**ADVERSARIAL[name])
    if noise:
        case = with_label_noise(case, rate=0.1)
    features, labels, options = as_dask(case, uneven_row_chunks(len(case["labels"]), seed=2))
    assert features.numblocks[0] >= 3
    report = ncfast.dask.collapse(features, da.from_array(labels, chunks=100),
                                  chunk_size=CHUNK_SIZE, scheduler="threads", **options)
    assert_same_report(report, single_process_report(case))


#: Cluster cases: random rows with a classifier, the D×D route, single-row classes.
CLUSTER_CASES = {
    "gaussian": {"num_rows": 4000, "num_features": 24, "num_classes": 6},
    "classes_exceed_features": ADVERSARIAL["classes_exceed_features"],
    "single_row_classes": ADVERSARIAL["single_row_classes"],
}


@pytest.mark.parametrize("name", CLUSTER_CASES)
def test_cluster_equals_single_process(client, name, assert_same_report):
    case = with_label_noise(gaussian_classes(**CLUSTER_CASES[name]), rate=0.1)
    features, labels, options = as_dask(case, uneven_row_chunks(len(case["labels"]), seed=3))
    report = ncfast.dask.collapse(features, labels, chunk_size=CHUNK_SIZE, **options)
    assert_same_report(report, single_process_report(case))


def test_options(assert_same_report):
    """global_mean, held-out means and a feature axis split in blocks."""
    train = gaussian_classes(num_rows=3000, num_classes=4, class_counts=[100, 400, 900, 1600])
    held_out = gaussian_classes(num_rows=1000, num_classes=4, seed=5)
    features = da.from_array(train["features"], chunks=(640, 8))
    report = ncfast.dask.collapse(features, train["labels"], global_mean="samples",
                                  chunk_size=CHUNK_SIZE, scheduler="threads")
    expected = single_process_report(
        {"features": train["features"], "labels": train["labels"]}, global_mean="samples")
    assert_same_report(report, expected)
    held_out_report = ncfast.dask.collapse(
        da.from_array(held_out["features"], chunks=(320, 32)), held_out["labels"], means=report,
        weights=held_out["weights"], chunk_size=CHUNK_SIZE, scheduler="threads")
    assert_same_report(held_out_report, ncfast.collapse(
        held_out["features"], held_out["labels"], means=expected, weights=held_out["weights"],
        chunk_size=CHUNK_SIZE))


def test_ood_rows_give_the_single_process_nc5(assert_same_report):
    """ood= as collapse takes it: a Dask array of rows, a numpy array, or their mean."""
    case = gaussian_classes(num_rows=2000, num_classes=5)
    ood = np.random.default_rng(7).normal(size=(700, case["features"].shape[1])) + 2.0
    features = da.from_array(case["features"], chunks=(640, -1))
    expected = ncfast.collapse(case["features"], case["labels"], ood=ood,
                               chunk_size=CHUNK_SIZE)
    assert expected.nc5 is not None
    for given in (da.from_array(ood, chunks=(128, -1)), ood, ood.mean(axis=0)):
        report = ncfast.dask.collapse(features, case["labels"], ood=given,
                                      chunk_size=CHUNK_SIZE, scheduler="threads")
        assert_same_report(report, expected)


@pytest.mark.parametrize("ood, error, message", [
    (np.zeros((0, 8)), ValueError, "ood has no rows"),
    (np.zeros((5, 7)), ValueError, r"ood has shape \(5, 7\); pass OOD features of shape \(n, 8\)"),
    (np.zeros((5, 8), np.int64), TypeError, "ood must be floating point"),
])
def test_bad_dask_ood_is_refused_before_the_passes(ood, error, message, monkeypatch):
    case = gaussian_classes(num_rows=200, num_classes=3, num_features=8)

    def no_pass(*args, **kwargs):
        raise AssertionError("pass 1 ran")

    monkeypatch.setattr(ncfast.dask, "pass1_block", no_pass)
    with pytest.raises(error, match=message):
        ncfast.dask.collapse(da.from_array(case["features"]), case["labels"],
                             ood=da.from_array(ood), scheduler="sync")


def test_dask_ood_of_unknown_length_is_counted(monkeypatch, assert_same_report):
    """A filtered Dask ``ood`` that kept no row was said to hold NaN or Inf (the mean of no
    rows); one that kept rows gives the nc5 of those rows."""
    case = gaussian_classes(num_rows=600, num_classes=3, num_features=8)
    features = da.from_array(case["features"], chunks=(200, -1))
    ood = np.random.default_rng(3).normal(size=(300, 8)) + 2.0
    dask_ood = da.from_array(ood, chunks=(100, -1))
    kept = dask_ood[dask_ood[:, 0] > 2.0]
    assert np.isnan(kept.shape[0])
    report = ncfast.dask.collapse(features, case["labels"], ood=kept, chunk_size=CHUNK_SIZE,
                                  scheduler="sync")
    assert_same_report(report, ncfast.collapse(case["features"], case["labels"],
                                               ood=ood[ood[:, 0] > 2.0], chunk_size=CHUNK_SIZE))

    def no_pass(*args, **kwargs):
        raise AssertionError("pass 1 ran")

    monkeypatch.setattr(ncfast.dask, "pass1_block", no_pass)
    with pytest.raises(ValueError, match="^ood has no rows; pass at least one OOD feature row"):
        ncfast.dask.collapse(features, case["labels"], ood=dask_ood[dask_ood[:, 0] > 100],
                             scheduler="sync")


def test_torch_tensors_give_the_report_of_collapse(assert_same_report):
    """Dask cannot read tensors: "Cannot interpret 'torch.int64' as a data type"."""
    torch = pytest.importorskip("torch")
    case = with_label_noise(gaussian_classes(num_rows=600, num_classes=4), rate=0.1)
    features, labels, clean = (torch.from_numpy(case[name])
                               for name in ("features", "labels", "clean_labels"))
    expected = ncfast.collapse(features, labels, clean_labels=clean, chunk_size=CHUNK_SIZE)
    for given in ((features, labels, clean),
                  (da.from_array(case["features"], chunks=(160, -1)), labels, clean),
                  (features.detach().requires_grad_(), case["labels"], case["clean_labels"])):
        report = ncfast.dask.collapse(given[0], given[1], clean_labels=given[2],
                                      chunk_size=CHUNK_SIZE, scheduler="sync")
        assert_same_report(report, expected)
    half = features.to(torch.bfloat16)
    assert_same_report(ncfast.dask.collapse(half, labels, chunk_size=CHUNK_SIZE,
                                            scheduler="sync"),
                       ncfast.collapse(half, labels, chunk_size=CHUNK_SIZE))
    with pytest.raises(ValueError, match="^labels is a torch tensor on the meta device"):
        ncfast.dask.collapse(features, labels.to("meta"), scheduler="sync")


def _counting_reads(block, block_info=None, *, reads):
    """The block unchanged; its index appended to ``reads``."""
    reads.append(block_info[0]["chunk-location"][0])
    return block


@pytest.mark.parametrize("options, error, message", [
    ({"weights": np.ones((3, 9))}, ValueError, r"weights has shape \(3, 9\); expected"),
    ({"weights": np.ones((3, 8)), "bias": np.ones(2)}, ValueError,
     r"bias has shape \(2,\); expected \(3,\)"),
    ({"global_mean": "bogus"}, ValueError, "global_mean must be one of"),
], ids=["weights", "bias", "global-mean"])
@pytest.mark.parametrize("num_classes", [3, None], ids=["given", "inferred"])
def test_a_bad_classifier_or_global_mean_is_refused_before_any_block(options, error, message,
                                                                     num_classes):
    """They were refused after pass 1 had read every block of features."""
    case = gaussian_classes(num_rows=400, num_classes=3, num_features=8)
    reads = []
    features = da.from_array(case["features"], chunks=(100, -1)).map_blocks(
        _counting_reads, reads=reads, dtype=np.float32)
    with pytest.raises(error, match=message):
        ncfast.dask.collapse(features, case["labels"], num_classes=num_classes,
                             scheduler="sync", **options)
    assert reads == []


def test_blocks_off_the_chunk_grid(assert_same_report):
    """Any block sizes: the float64 metrics agree to 1e-10, those of the GEMM to 1e-6."""
    case = with_label_noise(gaussian_classes(num_rows=5000, spread=0.05))
    features, labels, options = as_dask(case, (997, 1, 2003, 1999))
    report = ncfast.dask.collapse(features, labels, scheduler="threads", **options)
    expected = ncfast.collapse(case["features"], case["labels"], **options)
    assert_same_report(report, expected, rtol=1e-6)
    for name in ("nc1_trace", "cdnv", "nc2_etf", "nc3", "memorization", "dilation"):
        assert getattr(report, name) == pytest.approx(getattr(expected, name), rel=1e-10)


def _features_dying_once(block, block_id=None, *, log_dir, victim, kill_at):
    """The block unchanged; the worker computing block ``victim`` for the
    ``kill_at``-th time dies instead (``os._exit``), once per ``log_dir``."""
    if block_id[0] == victim:
        log = os.path.join(log_dir, "victim.log")
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        with open(log) as handle:
            times = len(handle.readlines())
        if times == kill_at:
            os._exit(1)
    return block


@pytest.mark.parametrize("kill_at", [1, 2], ids=["pass1", "pass2"])
def test_worker_killed_mid_pass(client, kill_at, tmp_path, assert_same_report):
    case = gaussian_classes(num_rows=6000, num_features=16, num_classes=5)
    features, labels, options = as_dask(case, (1024, 2048, 896, 2032))
    dying = features.map_blocks(_features_dying_once, log_dir=str(tmp_path), victim=2,
                                kill_at=kill_at, dtype=features.dtype)
    report = ncfast.dask.collapse(dying, labels, chunk_size=CHUNK_SIZE, **options)
    pids = (tmp_path / "victim.log").read_text().split()
    # Computed in pass 1 and pass 2, plus the retry of the computation that died.
    assert len(pids) == 3 and pids[kill_at - 1] != pids[kill_at]
    assert_same_report(report, single_process_report(case))


def test_errors_name_the_row_of_the_whole_input():
    case = gaussian_classes(num_rows=1000, num_classes=3)
    labels = case["labels"].copy()
    labels[731] = 7
    features = da.from_array(case["features"], chunks=(300, 32))
    with pytest.raises(ValueError, match="row 731 has label 7, outside"):
        ncfast.dask.collapse(features, labels, num_classes=3, scheduler="sync")
    unknown = features[da.from_array(labels, chunks=300) >= 0]
    with pytest.raises(ValueError, match="compute_chunk_sizes"):
        ncfast.dask.collapse(unknown, labels, scheduler="sync")
    with pytest.raises(ValueError, match="labels has 999 entries"):
        ncfast.dask.collapse(features, labels[:999], scheduler="sync")
    dask_labels = da.from_array(case["labels"], chunks=300)
    of_unknown_length = dask_labels[dask_labels >= 0]
    with pytest.raises(ValueError, match=r"^labels has unknown block sizes .* call "
                                         r"labels\.compute_chunk_sizes\(\) first"):
        ncfast.dask.collapse(features, of_unknown_length, scheduler="sync")
    with pytest.raises(ValueError, match=r"^clean_labels has unknown block sizes"):
        ncfast.dask.collapse(features, case["labels"], clean_labels=of_unknown_length,
                             scheduler="sync")
    huge = case["labels"].astype(np.uint64)
    huge[731] = 2 ** 63 + 5
    with pytest.raises(ValueError, match=r"row 731 has label 9223372036854775813, but only 4 "
                                         r"distinct .*return_inverse=True\)\)$"):
        ncfast.dask.collapse(features, huge, scheduler="sync")
    clean = case["labels"].copy()
    clean[[402, 731]] = 50
    with pytest.raises(ValueError, match="row 402 has clean label 50, but only 4 distinct"):
        ncfast.dask.collapse(features, case["labels"], clean_labels=clean, scheduler="sync")


def test_empty_blocks_with_num_classes_inferred(assert_same_report):
    """Blocks of no rows, first and last: the label summary skips them."""
    case = with_label_noise(gaussian_classes(num_rows=1000, num_classes=3), rate=0.1)
    features = da.from_array(case["features"], chunks=((0, 400, 0, 600, 0), 32))
    report = ncfast.dask.collapse(features, case["labels"], clean_labels=case["clean_labels"],
                                  chunk_size=CHUNK_SIZE, scheduler="sync")
    assert_same_report(report, ncfast.collapse(case["features"], case["labels"],
                                               clean_labels=case["clean_labels"],
                                               chunk_size=CHUNK_SIZE))


def test_import_ncfast_needs_neither_dask_nor_torch():
    code = ("import sys, ncfast; ncfast.collapse([[0.0], [1.0]], [0, 1]); "
            "assert not {'dask', 'distributed', 'torch'} & set(sys.modules), sys.modules.keys()")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_zarr_hdf5_and_npy_inputs(tmp_path, assert_same_report):
    """The stores the issue names, read block by block through Dask."""
    zarr = pytest.importorskip("zarr")
    h5py = pytest.importorskip("h5py")
    case = gaussian_classes(num_rows=2000, num_features=12, num_classes=4)
    features, labels = case["features"], case["labels"]
    expected = single_process_report(case)
    stored = zarr.create_array(str(tmp_path / "features.zarr"), shape=features.shape,
                               chunks=(400, 12), dtype="float32")
    stored[:] = features
    with h5py.File(tmp_path / "features.h5", "w") as handle:
        handle["features"] = features
    for part, start in enumerate(range(0, 2000, 800)):
        np.save(tmp_path / f"part{part}.npy", features[start:start + 800])
    with h5py.File(tmp_path / "features.h5", "r") as handle:
        inputs = {
            "zarr": da.from_zarr(str(tmp_path / "features.zarr")),
            "hdf5": da.from_array(handle["features"], chunks=(480, 12)),
            "npy": da.concatenate([da.from_array(np.load(tmp_path / f"part{part}.npy",
                                                         mmap_mode="r"), chunks=(320, 12))
                                   for part in range(3)]),
        }
        for name, array in inputs.items():
            report = ncfast.dask.collapse(array, labels, weights=case["weights"],
                                          bias=case["bias"], chunk_size=CHUNK_SIZE,
                                          scheduler="threads")
            assert_same_report(report, expected)


def test_a_feature_axis_in_two_blocks_is_rechunked():
    """With exactly two column blocks, the blocks were not made whole rows."""
    case = gaussian_classes(num_rows=600, num_features=32, num_classes=4)
    features = da.from_array(case["features"], chunks=(200, 16))
    assert features.numblocks[1] == 2
    report = ncfast.dask.collapse(features, case["labels"], scheduler="sync")
    expected = ncfast.collapse(case["features"], case["labels"])
    assert report.nc1 == pytest.approx(expected.nc1, rel=1e-6)
    assert report.nc2_etf == pytest.approx(expected.nc2_etf, rel=1e-6)


@pytest.mark.parametrize("split_every", [1, 0, True, 2.0])
def test_a_bad_split_every_is_refused(split_every):
    """Split_every=1 was accepted; with two blocks or more _tree_sum never ends."""
    case = gaussian_classes(num_rows=100, num_classes=3)
    features = da.from_array(case["features"], chunks=(100, -1))  # one block: no hang
    with pytest.raises(ValueError, match="split_every must be an int of at least 2"):
        ncfast.dask.collapse(features, case["labels"], split_every=split_every,
                             scheduler="sync")


def test_clean_labels_with_means_are_refused():
    """Clean labels with held-out means must be refused as ncfast.collapse refuses."""
    case = with_label_noise(gaussian_classes(num_rows=300, num_classes=3), rate=0.1)
    means = ncfast.collapse(case["features"], case["labels"])
    features = da.from_array(case["features"], chunks=(100, -1))
    with pytest.raises(ValueError, match="cannot be combined with means="):
        ncfast.collapse(case["features"], case["labels"], means=means,
                        clean_labels=case["clean_labels"])
    with pytest.raises(ValueError, match="cannot be combined with means="):
        ncfast.dask.collapse(features, case["labels"], means=means,
                             clean_labels=case["clean_labels"], scheduler="sync")


def test_errors_name_the_row_of_the_whole_input_with_uneven_blocks():
    """A block's first row is the sum of the sizes of the blocks before it; with blocks
    of one size the last block's size never counted, so a wrong offset went unseen."""
    case = gaussian_classes(num_rows=1000, num_classes=3)
    labels = case["labels"].copy()
    labels[731] = 7
    features = da.from_array(case["features"], chunks=((100, 400, 500), 32))
    with pytest.raises(ValueError, match="row 731 has label 7, outside"):
        ncfast.dask.collapse(features, labels, num_classes=3, scheduler="sync")


def test_blocks_leave_no_scratch_with_the_worker():
    """Each block's pass runs in its own scratch scope: a long-lived worker keeps none of
    a block's chunk scratch when the task ends."""
    from ncfast.kernels import cpu

    case = gaussian_classes(num_rows=400, num_features=8, num_classes=30, seed=4)
    features = da.from_array(case["features"], chunks=(100, 8))
    labels = da.from_array(case["labels"], chunks=100)
    cpu.release_scratch()
    ncfast.dask.collapse(features, labels, chunk_size=CHUNK_SIZE, scheduler="threads")
    assert cpu.scratch_bytes() == 0


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_progress_counts_each_blocks_rows_as_its_task_ends(scheduler, monkeypatch, capsys):
    """Dask's local schedulers: each pass's stage advances by a block's rows per block
    task (the empty block adds nothing), between them the class-pair tiles; the report is
    the one without progress, which prints nothing."""
    import io

    from rich.console import Console
    from rich.progress import Progress

    case = gaussian_classes(1500, 8, 600, spread=0.5, seed=4)
    row_chunks = uneven_row_chunks(1500, seed=5)
    features, labels, options = as_dask(case, row_chunks)
    quiet = ncfast.dask.collapse(features, labels, chunk_size=CHUNK_SIZE, scheduler=scheduler,
                                 empty_classes="ignore", **options)
    assert capsys.readouterr().err == ""
    advanced = []
    with Progress(console=Console(file=io.StringIO(), force_terminal=True)) as theirs:
        descriptions = {}
        add_task = theirs.add_task

        def recorded_task(description, **fields):
            task = add_task(description, **fields)
            descriptions[task] = description
            return task

        monkeypatch.setattr(theirs, "add_task", recorded_task)
        monkeypatch.setattr(theirs, "advance",
                            lambda task, steps: advanced.append((descriptions[task], steps)))
        told = ncfast.dask.collapse(features, labels, chunk_size=CHUNK_SIZE,
                                    scheduler=scheduler, empty_classes="ignore",
                                    progress=ncfast.StageProgress(True, bars=theirs), **options)
    assert told == quiet
    block_rows = sorted(rows for rows in row_chunks if rows)
    assert sorted(steps for stage, steps in advanced if stage == "pass 1: class sums") == \
        block_rows
    assert sorted(steps for stage, steps in advanced if stage == "pass 2: residuals") == \
        block_rows
    assert [steps for stage, steps in advanced if stage == "class pairs"] == [1, 1, 1]

    ncfast.dask.collapse(features, labels, chunk_size=CHUNK_SIZE, scheduler=scheduler,
                         empty_classes="ignore", progress=True, **options)
    lines = [line.rsplit(" in ", 1)[0] for line in capsys.readouterr().err.splitlines()]
    assert lines == ["ncfast: pass 1: class sums: 1,500 rows", "ncfast: class pairs: 3 tiles",
                     "ncfast: pass 2: residuals: 1,500 rows"]


def test_progress_on_a_cluster_counts_the_rows_when_the_pass_returns(client, capsys,
                                                                      assert_same_report):
    """A distributed.Client runs the block tasks on its workers, where no local callback
    sees them: each pass's rows are counted when its compute returns."""
    case = gaussian_classes(**CLUSTER_CASES["gaussian"])
    features, labels, options = as_dask(case, uneven_row_chunks(len(case["labels"]), seed=6))
    report = ncfast.dask.collapse(features, labels, chunk_size=CHUNK_SIZE, progress=True,
                                  **options)
    assert_same_report(report, single_process_report(case))
    assert [line.split(" in ")[0] for line in capsys.readouterr().err.splitlines()] == [
        "ncfast: pass 1: class sums: 4,000 rows", "ncfast: class pairs: 1 tiles",
        "ncfast: pass 2: residuals: 4,000 rows"]


@pytest.mark.parametrize("value", [1, "yes", None])
def test_progress_must_be_a_bool(value):
    case = gaussian_classes(100, 4, 3)
    with pytest.raises(TypeError, match="^progress must be True, False or an "):
        ncfast.dask.collapse(da.from_array(case["features"], chunks=50), case["labels"],
                             progress=value)
