"""The CUDA backend against the CPU backend: every metric, chunking and merge laws.

GPU tests skip cleanly without CuPy or a CUDA GPU. Launch shapes are shrunk
(one warp per block, 32-column pass-1 blocks) so that the multi-block paths,
and both the shared-memory and the global-atomics state, run on small inputs.
"""
import subprocess
import sys

import numpy as np
import pytest

import ncfast
from cases import ADVERSARIAL, gaussian_classes, with_label_noise

#: GPU and CPU reports agree to this relative error (issue 5).
GPU_TOLERANCE = 1e-6


def _gpu_available():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, no device: all mean "no GPU here"
        return False


HAS_GPU = _gpu_available()
requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs CuPy and a CUDA GPU")


@pytest.fixture(params=["shared", "global"])
def small_launches(request, monkeypatch):
    """Tiny blocks and chunks so multi-block paths run; private state in shared memory or
    not."""
    from ncfast.backends import cuda as backend
    from ncfast.kernels import cuda as kernels
    monkeypatch.setattr(kernels, "THREADS_PER_BLOCK", 32)
    monkeypatch.setattr(kernels, "CLASS_SUM_COLUMNS", 32)
    # Pass-2 chunks of resident rows, and batches of rows searched over every class,
    # of a few hundred rows.
    monkeypatch.setattr(backend, "RESIDUAL_CHUNK_BYTES", 1 << 16)
    if request.param == "global":
        monkeypatch.setattr(kernels, "SHARED_STATE_BYTES", 0)
    return kernels


def _keywords(case):
    return {key: case[key] for key in ("num_classes", "weights", "bias", "clean_labels")
            if key in case}


def test_importing_ncfast_never_imports_cupy():
    code = "import sys, ncfast, ncfast.backends.cuda; assert 'cupy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(HAS_GPU, reason="checks the error raised without a GPU")
def test_cuda_without_gpu_raises_one_clear_error():
    case = gaussian_classes(num_rows=50)
    with pytest.raises(RuntimeError, match="device='cuda' needs"):
        ncfast.collapse(case["features"], case["labels"], device="cuda")


def test_unknown_device_is_refused():
    case = gaussian_classes(num_rows=50)
    with pytest.raises(ValueError, match="device must be one of"):
        ncfast.collapse(case["features"], case["labels"], device="gpu")


@requires_gpu
@pytest.mark.parametrize("placement", ["resident", "streamed"])
@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_cases_match_cpu(name, placement, small_launches, assert_same_report):
    import cupy
    case = gaussian_classes(**ADVERSARIAL[name])
    expected = ncfast.collapse(case["features"], case["labels"], **_keywords(case))
    if placement == "resident":
        actual = ncfast.collapse(cupy.asarray(case["features"]), cupy.asarray(case["labels"]),
                                 **_keywords(case))
    else:
        actual = ncfast.collapse(case["features"], case["labels"], device="cuda",
                                 chunk_size=257, **_keywords(case))
    assert_same_report(actual, expected, rtol=GPU_TOLERANCE)


@requires_gpu
@pytest.mark.parametrize("placement", ["resident", "streamed"])
@pytest.mark.parametrize("name", ["gaussian", "classes_exceed_features"])
def test_label_noise_matches_cpu(name, placement, small_launches, assert_same_report):
    import cupy
    case = with_label_noise(gaussian_classes(**ADVERSARIAL[name]))
    expected = ncfast.collapse(case["features"], case["labels"], **_keywords(case))
    features, labels, clean = case["features"], case["labels"], case["clean_labels"]
    if placement == "resident":
        features, labels, clean = map(cupy.asarray, (features, labels, clean))
    keywords = {**_keywords(case), "clean_labels": clean}
    actual = ncfast.collapse(features, labels, device="cuda", chunk_size=300, **keywords)
    assert_same_report(actual, expected, rtol=GPU_TOLERANCE)


@requires_gpu
@pytest.mark.parametrize("placement", ["resident", "streamed"])
@pytest.mark.parametrize("classifier", [True, False])
def test_features_route_rows_inside_their_radii_match_cpu(placement, classifier, small_launches,
                                                          assert_same_report):
    """C > D with tight clouds: every row inside its NCC radius, half of them inside their
    classifier radius (so the others are searched over the logits alone), and the
    corrupted rows beyond both."""
    import cupy
    case = with_label_noise(gaussian_classes(num_rows=4000, num_features=8, num_classes=40,
                                             spread=0.2, classifier=classifier))
    expected = ncfast.collapse(case["features"], case["labels"], **_keywords(case))
    features, labels, clean = case["features"], case["labels"], case["clean_labels"]
    if placement == "resident":
        features, labels, clean = map(cupy.asarray, (features, labels, clean))
    actual = ncfast.collapse(features, labels, device="cuda", chunk_size=1500,
                             **{**_keywords(case), "clean_labels": clean})
    assert_same_report(actual, expected, rtol=GPU_TOLERANCE)


@requires_gpu
def test_chunks_on_two_streams_lose_no_row(assert_same_report):
    """Resident rows alternate between two streams in pass 2; each stream adds into sums
    of its own (an array-operation tally racing another stream's atomics lost 98 of
    2,000,000 rows at 32,768 classes). Many chunks, half their rows searched."""
    import cupy
    case = gaussian_classes(num_rows=300_000, num_features=16, num_classes=48, spread=0.5)
    expected = ncfast.collapse(case["features"], case["labels"], **_keywords(case))
    features, labels = cupy.asarray(case["features"]), cupy.asarray(case["labels"])
    for _ in range(3):
        actual = ncfast.collapse(features, labels, chunk_size=4000, **_keywords(case))
        assert_same_report(actual, expected, rtol=GPU_TOLERANCE)


def _tallies(num_classes, dtype):
    return {"counts": np.zeros(num_classes, dtype), "ncc_hits": np.zeros(num_classes, dtype),
            "classifier_hits": np.zeros(num_classes, dtype),
            "sq_norm_sums": np.zeros(num_classes), "norm_sums": np.zeros(num_classes),
            "totals": np.zeros(3, dtype)}


@pytest.mark.parametrize("classifier", [True, False])
@pytest.mark.parametrize("noise", [True, False])
def test_rows_inside_their_radii_are_tallied_as_the_cpu_kernel_does(classifier, noise):
    """The GPU's array-operation tally of the rows inside both radii (run here on numpy)
    against the CPU kernel's tally of the same rows with their own class as the NCC
    prediction and their mean's as the classifier's."""
    from ncfast.backends.cuda import split_by_radii, tally_rows_inside
    from ncfast.kernels import cpu
    rng = np.random.default_rng(5)
    num_rows, num_classes = 5000, 30
    label_rows = np.arange(num_classes)
    label_rows[[4, 17]] = -1  # classes without a mean
    label_rows[label_rows >= 0] = np.arange(num_classes - 2)
    labels = rng.integers(0, num_classes, num_rows)
    sq_norms = rng.exponential(1.0, num_rows)
    sq_norms[label_rows[labels] < 0] = -1.0  # not counted, as the residual kernel leaves them
    sq_norms[rng.random(num_rows) < 0.05] = -1.0  # rows left out (label-noise split)
    sq_norms[[7, 99]] = np.nan  # reported bad rows
    ncc_sq_radii = rng.uniform(0.5, 3.0, num_classes - 2)
    classifier_sq_radii = rng.uniform(0.0, 2.0, num_classes - 2) if classifier else None
    mean_predictions = None
    if classifier:
        mean_predictions = np.where(rng.random(num_classes - 2) < 0.8, np.flatnonzero(
            label_rows >= 0), rng.integers(0, num_classes, num_classes - 2))
    corrupted = (rng.random(num_rows) < 0.2).astype(np.uint8) if noise else None

    inside, beyond_ncc, beyond_classifier = split_by_radii(
        np, labels, sq_norms, label_rows, ncc_sq_radii, classifier_sq_radii)
    counted = np.flatnonzero(sq_norms >= 0)
    mean_rows = label_rows[labels[counted]]
    near = sq_norms[counted] < ncc_sq_radii[mean_rows]
    certain = sq_norms[counted] < classifier_sq_radii[mean_rows] if classifier else near | True
    assert np.array_equal(inside, counted[near & certain])
    assert np.array_equal(beyond_ncc, counted[~near])
    assert np.array_equal(beyond_classifier, counted[near & ~certain])
    assert 0 < inside.size and 0 < beyond_ncc.size
    assert (beyond_classifier.size > 0) == classifier

    actual = _tallies(num_classes, np.uint64)
    tally_rows_inside(np, actual, inside, labels, sq_norms, label_rows, mean_predictions,
                      corrupted)
    expected = _tallies(num_classes, np.int64)
    cpu.tally_rows(sq_norms[inside], labels[inside], labels[inside],
                   mean_predictions[label_rows[labels[inside]]] if classifier
                   else np.empty(0, np.int64),
                   corrupted[inside] if noise else np.empty(0, np.uint8),
                   *(expected[name] for name in ("counts", "sq_norm_sums", "norm_sums",
                                                 "ncc_hits", "classifier_hits", "totals")))
    for name, values in expected.items():
        np.testing.assert_allclose(actual[name], values, rtol=1e-12, err_msg=name)
    assert expected["totals"][0] > 0 if classifier else expected["totals"][0] == 0
    assert expected["totals"][2] > 0 if noise else expected["totals"][1] == 0


@requires_gpu
def test_held_out_rows_against_training_means(small_launches, assert_same_report):
    train = gaussian_classes(seed=0)
    test = gaussian_classes(num_rows=700, seed=0)
    test["features"] = test["features"] + 0.5 * np.random.default_rng(3).normal(
        size=test["features"].shape).astype(np.float32)
    report = ncfast.collapse(train["features"], train["labels"], weights=train["weights"])
    expected = ncfast.collapse(test["features"], test["labels"], means=report,
                               weights=train["weights"])
    actual = ncfast.collapse(test["features"], test["labels"], means=report,
                             weights=train["weights"], device="cuda")
    assert_same_report(actual, expected, rtol=GPU_TOLERANCE)


@requires_gpu
def test_chunk_sources_and_torch_cuda_tensors(small_launches, assert_same_report):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    case = gaussian_classes(relu=True, offset=10.0)
    expected = ncfast.collapse(case["features"], case["labels"], weights=case["weights"],
                               bias=case["bias"])
    chunks = [(case["features"][i:i + 500], case["labels"][i:i + 500])
              for i in range(0, len(case["labels"]), 500)]
    from_chunks = ncfast.collapse(chunks, num_classes=case["num_classes"],
                                  weights=case["weights"], bias=case["bias"], device="cuda")
    assert_same_report(from_chunks, expected, rtol=GPU_TOLERANCE)
    features = torch.as_tensor(case["features"], device="cuda")
    from_torch = ncfast.collapse(features, torch.as_tensor(case["labels"], device="cuda"),
                                 weights=case["weights"], bias=case["bias"], chunk_size=999)
    assert_same_report(from_torch, expected, rtol=GPU_TOLERANCE)
    half = ncfast.collapse(features.half(), case["labels"], weights=case["weights"],
                           bias=case["bias"])
    expected_half = ncfast.collapse(case["features"].astype(np.float16), case["labels"],
                                    weights=case["weights"], bias=case["bias"])
    assert_same_report(half, expected_half, rtol=GPU_TOLERANCE)


@requires_gpu
def test_page_locked_host_rows_are_copied_in_place(small_launches, assert_same_report):
    import cupy
    case = gaussian_classes(offset=3.0)
    expected = ncfast.collapse(case["features"], case["labels"], weights=case["weights"])
    pinned = np.frombuffer(cupy.cuda.alloc_pinned_memory(case["features"].nbytes), np.float32,
                           case["features"].size).reshape(case["features"].shape)
    pinned[...] = case["features"]
    actual = ncfast.collapse(pinned, case["labels"], weights=case["weights"], device="cuda",
                             chunk_size=700)
    assert_same_report(actual, expected, rtol=GPU_TOLERANCE)


@requires_gpu
@pytest.mark.parametrize("chunk_size", [1, 37, 1000, None])
def test_results_do_not_depend_on_chunking(chunk_size, small_launches, assert_same_report):
    import cupy
    case = gaussian_classes(num_rows=2000, offset=100.0)
    whole = ncfast.collapse(cupy.asarray(case["features"]), case["labels"],
                            weights=case["weights"])
    resident = ncfast.collapse(cupy.asarray(case["features"]), case["labels"],
                               weights=case["weights"], chunk_size=chunk_size)
    streamed = ncfast.collapse(case["features"], case["labels"], weights=case["weights"],
                               chunk_size=chunk_size, device="cuda")
    # cuBLAS picks its GEMM kernel by shape, so float32 products round differently.
    assert_same_report(resident, whole, rtol=1e-7)
    assert_same_report(streamed, whole, rtol=1e-7)


@requires_gpu
@pytest.mark.parametrize("num_classes", [100, 300])
def test_a_device_with_less_shared_memory_per_block_gets_smaller_requests(num_classes,
                                                                          monkeypatch,
                                                                          assert_same_report):
    """The launchers asked for up to 112 KiB of shared memory a block whatever the device:
    on an sm_86/sm_89 GPU (99 KB a block) pass 1 of 100 classes asked for 103,200 bytes and
    the launch failed; on sm_75 (64 KB) from 64 classes on. Here the device is made to say
    64 KiB: every request stays within it, and the results are the CPU's."""
    from ncfast.kernels import cuda as kernels
    monkeypatch.setattr(kernels, "_device_shared_memory", lambda device_id: (64 << 10, 64 << 10))
    requests = []
    kernel = kernels._kernel

    def recorded(name, shared_bytes):
        requests.append(shared_bytes)
        return kernel(name, shared_bytes)

    monkeypatch.setattr(kernels, "_kernel", recorded)
    case = with_label_noise(gaussian_classes(num_rows=4000, num_features=48,
                                             num_classes=num_classes))
    expected = ncfast.collapse(**case)
    actual = ncfast.collapse(case["features"], case["labels"], **_keywords(case), device="cuda")
    assert_same_report(actual, expected, rtol=GPU_TOLERANCE)
    assert requests and max(requests) <= 64 << 10


@requires_gpu
@pytest.mark.parametrize("num_classes", [6, 40], ids=["classes", "features"])
def test_nc1_with_nearly_flat_directions_matches_textbook_on_the_gpu(num_classes,
                                                                     small_launches):
    """As the CPU test of that name (tests/test_metrics.py): three directions of the means'
    span shrunk 1000-fold (``pinv_condition`` 2e6). The "classes" route multiplied the
    residuals by M~^T and rotated the float32 products into the Gram's eigenbasis
    afterwards: in a float64 emulation NC1 was 1.2e-3 off here, and 4.96 times its value
    at a 1e4-fold shrink."""
    import cupy
    from ncfast.textbook import textbook_collapse
    case = gaussian_classes(num_rows=6000, num_features=16, num_classes=num_classes,
                            offset=3.0, flat_scale=1e-3)
    report = ncfast.collapse(cupy.asarray(case["features"]), case["labels"], **_keywords(case))
    assert report.route == ("classes" if num_classes <= 16 else "features")
    assert report.pinv_condition > 1e6
    assert report.nc1 == pytest.approx(textbook_collapse(**case)["nc1"], rel=1e-5, abs=0)


@requires_gpu
@pytest.mark.parametrize("placement", ["resident", "streamed"])
@pytest.mark.parametrize("chunk_size", [7000, None])
def test_float64_rows_far_from_the_origin_keep_their_spread(placement, chunk_size):
    """As the CPU test of that name (tests/test_metrics.py), with the GPU's launch shapes:
    pass 1's blocks each add their partial sums into the class totals, and at 1e12 from
    the origin each addition rounds by the ulp of a total near 1e16. A float64 simulation
    of that order of additions moved the means by up to 0.024 (spread 0.1) and
    ``Tr Σ_W`` by 0.45%; the rows are now summed less a shift (``DeviceClassSums``)."""
    import cupy
    from ncfast.textbook import textbook_collapse
    offset = 1e12
    case = with_label_noise(gaussian_classes(num_rows=100_000, num_features=16, num_classes=4,
                                             spread=0.1, offset=offset, dtype=np.float64,
                                             classifier=False))
    features = case["features"]
    report = ncfast.collapse(cupy.asarray(features) if placement == "resident" else features,
                             case["labels"], **_keywords(case), chunk_size=chunk_size,
                             device="cuda")
    reference = textbook_collapse(**dict(case, features=features - offset))
    for name in ("nc1", "nc1_trace", "cdnv", "nc1_clean", "dilation", "memorization"):
        assert getattr(report, name) == pytest.approx(reference[name], rel=1e-4), name
    np.testing.assert_allclose(report.class_variances, reference["class_variances"], rtol=1e-6)


@requires_gpu
@pytest.mark.parametrize("placement", ["resident", "streamed"])
def test_float64_rows_far_from_the_origin_in_small_chunks_keep_their_spread(placement):
    """As the CPU test of that name (tests/test_metrics.py): the host's class totals took
    each pass's device sums with one rounding, and the device sums every chunk of the pass
    less one shift, so small chunks should change nothing; not yet run on a GPU."""
    import cupy
    from ncfast.textbook import textbook_collapse
    offset, rows = 1e6, 20_000
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, rows)
    features = offset + (1e-3 * rng.normal(size=(4, 8))[labels]
                         + 1e-7 * rng.normal(size=(rows, 8)))
    report = ncfast.collapse(cupy.asarray(features) if placement == "resident" else features,
                             labels, chunk_size=8, device="cuda")
    reference = textbook_collapse(features - offset, labels)  # exact: within 2x
    for name in ("nc1", "nc1_trace", "cdnv"):
        assert getattr(report, name) == pytest.approx(reference[name], rel=1e-5), name
    np.testing.assert_allclose(report.class_variances, reference["class_variances"], rtol=1e-5)


@requires_gpu
@pytest.mark.parametrize("split", [1, 999, 2999])
def test_pass_states_merge_by_addition(split, small_launches):
    import cupy
    from ncfast.backends.cuda import DeviceClassSums, ResidentSource
    case = gaussian_classes(num_rows=3000, offset=1e3)
    features, labels = cupy.asarray(case["features"]), cupy.asarray(case["labels"])
    source = ResidentSource(features, labels)

    def host_sums(start, stop):
        host = ncfast.ClassSums(5, features.shape[1])
        DeviceClassSums(5, features.shape[1]).update(
            features[start:stop], labels[start:stop], row_offset=start).add_to_host(host, source)
        return host

    whole, first, second = host_sums(0, 3000), host_sums(0, split), host_sums(split, 3000)
    merged = first + second
    assert np.array_equal(merged.counts, whole.counts)
    np.testing.assert_allclose(merged.sums, whole.sums, rtol=1e-13)
    cpu = ncfast.ClassSums(5, features.shape[1]).update(case["features"], case["labels"])
    assert np.array_equal(whole.counts, cpu.counts)
    np.testing.assert_allclose(whole.sums, cpu.sums, rtol=1e-12)


@requires_gpu
@pytest.mark.parametrize("placement", ["resident", "streamed"])
def test_bad_rows_raise_the_cpu_errors(placement, small_launches):
    import cupy
    case = gaussian_classes(num_rows=600)
    bad_value = case["features"].copy()
    bad_value[417, 3] = np.inf
    bad_label = case["labels"].copy()
    bad_label[321] = 9
    for features, labels in ((bad_value, case["labels"]), (case["features"], bad_label)):
        with pytest.raises(ValueError) as cpu_error:
            ncfast.collapse(features, labels, num_classes=5)
        if placement == "resident":
            features, labels = cupy.asarray(features), cupy.asarray(labels)
        with pytest.raises(ValueError) as gpu_error:
            ncfast.collapse(features, labels, num_classes=5, device="cuda", chunk_size=100)
        assert str(gpu_error.value) == str(cpu_error.value)


@requires_gpu
def test_stray_label_inferred_on_the_gpu_is_named_as_on_the_cpu():
    """Device arrays summarize their labels on the device: the same error as the CPU's,
    a stray clean label named as such."""
    import cupy
    case = gaussian_classes(num_rows=500)
    for which in ("labels", "clean_labels"):
        labels = {"labels": case["labels"].copy(), "clean_labels": case["labels"].copy()}
        labels[which][[321, 400]] = 90
        with pytest.raises(ValueError, match="but only 6 distinct") as cpu_error:
            ncfast.collapse(case["features"], **labels)
        with pytest.raises(ValueError) as gpu_error:
            ncfast.collapse(cupy.asarray(case["features"]),
                            **{name: cupy.asarray(value) for name, value in labels.items()},
                            device="cuda")
        assert str(gpu_error.value) == str(cpu_error.value)
        assert ("clean label 90" in str(gpu_error.value)) == (which == "clean_labels")


@requires_gpu
def test_gpu_arrays_refuse_device_cpu():
    import cupy
    case = gaussian_classes(num_rows=50)
    with pytest.raises(ValueError, match="features are on a GPU"):
        ncfast.collapse(cupy.asarray(case["features"]), case["labels"], device="cpu")


@requires_gpu
def test_float32_gemm_is_true_float32_even_with_tf32_on_the_handle():
    import cupy
    from cupy_backends.cuda.libs import cublas
    from ncfast.kernels import cuda as kernels
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(512, 1024)).astype(np.float32)
    matrix = rng.normal(size=(1024, 256)).astype(np.float32)
    handle = cupy.cuda.device.get_cublas_handle()
    previous = cublas.getMathMode(handle)
    cublas.setMathMode(handle, 3)  # CUBLAS_TF32_TENSOR_OP_MATH
    try:
        out = cupy.empty((512, 256), cupy.float32)
        kernels.matmul_f32(cupy.asarray(rows), cupy.asarray(matrix), out)
    finally:
        cublas.setMathMode(handle, previous)
    reference = rows.astype(np.float64) @ matrix.astype(np.float64)
    error = np.linalg.norm(out.get() - reference) / np.linalg.norm(reference)
    assert error < 1e-6, f"relative error {error:.2e}: TF32 (about 3e-4) or worse"
