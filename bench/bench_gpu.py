"""GPU benchmark (issue 5): N=10,000,000 × D=512 × C=100 float32 with a classifier.

Prints one table from one run: ncfast with the features resident on the GPU
and streamed from host memory; the floor (the two passes' reads over the
device-to-device copy bandwidth plus the GEMM flops over the sgemm rate, both
measured in this run); the pinned host-to-device copy time of the two passes'
reads (measured in this run); the textbook route in torch on the same GPU; and
the CPU backend on fewer rows, scaled linearly to N (stated in the table).

Run on a CUDA machine with CuPy and torch::

    python bench/bench_gpu.py            # the issue's sizes
    python bench/bench_gpu.py --rows 1000000 --cpu-rows 100000   # quicker
"""
import argparse
import time

import numpy as np

import ncfast

#: Targets of issue 5.
RESIDENT_OVER_FLOOR = 1.5
TEXTBOOK_SPEEDUP = 20.0
STREAMED_OVER_COPY = 1.2


def synthetic_features(cupy, num_rows, num_features, num_classes, seed=0):
    """Gaussian class clouds on the GPU (float32), with a classifier near the means."""
    rng = cupy.random.default_rng(seed)
    class_means = 3.0 * rng.standard_normal((num_classes, num_features), dtype=cupy.float32)
    labels = rng.integers(0, num_classes, num_rows, dtype=cupy.int64)
    features = cupy.empty((num_rows, num_features), cupy.float32)
    block = 1 << 20
    for start in range(0, num_rows, block):
        stop = min(start + block, num_rows)
        features[start:stop] = class_means[labels[start:stop]] + rng.standard_normal(
            (stop - start, num_features), dtype=cupy.float32)
    weights = (class_means + 0.3 * rng.standard_normal(class_means.shape, dtype=cupy.float32))
    bias = 0.1 * rng.standard_normal(num_classes, dtype=cupy.float32)
    return features, labels, weights.get().astype(np.float64), bias.get().astype(np.float64)


def timed(cupy, function, repeats=1):
    """Best wall-clock time of ``function()`` (the device is idle before and after)."""
    best, result = np.inf, None
    for _ in range(repeats):
        cupy.cuda.Device().synchronize()
        start = time.perf_counter()
        result = function()
        cupy.cuda.Device().synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def event_time(cupy, function, repeats=3):
    """Best device time of ``function()`` between two CUDA events, in seconds."""
    best = np.inf
    for _ in range(repeats):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        function()
        stop.record()
        stop.synchronize()
        best = min(best, cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return best


def copy_bandwidth(cupy, nbytes=4 << 30):
    """Device-to-device copy rate, bytes read plus written per second."""
    source = cupy.ones(nbytes // 4, cupy.float32)
    target = cupy.empty_like(source)
    seconds = event_time(cupy, lambda: target.__setitem__(Ellipsis, source))
    return 2 * nbytes / seconds


def host_to_device_bandwidth(cupy, nbytes=2 << 30):
    """Pinned host-to-device copy rate, bytes per second."""
    pinned = np.frombuffer(cupy.cuda.alloc_pinned_memory(nbytes), np.uint8, nbytes)
    pinned[:] = 1
    target = cupy.empty(nbytes, cupy.uint8)
    runtime = cupy.cuda.runtime
    seconds = event_time(cupy, lambda: runtime.memcpyAsync(
        target.data.ptr, pinned.ctypes.data, nbytes, runtime.memcpyHostToDevice,
        cupy.cuda.get_current_stream().ptr))
    return nbytes / seconds


def sgemm_rate(cupy, kernels, size=8192):
    """True-float32 cuBLAS GEMM rate (flop/s) of ncfast's own GEMM call."""
    rng = cupy.random.default_rng(1)
    a = rng.standard_normal((size, size), dtype=cupy.float32)
    b = rng.standard_normal((size, size), dtype=cupy.float32)
    out = cupy.empty((size, size), cupy.float32)
    kernels.matmul_f32(a, b, out)
    return 2.0 * size ** 3 / event_time(cupy, lambda: kernels.matmul_f32(a, b, out))


def torch_textbook_nc(torch, features, labels, weights, bias, num_classes):
    """``ncfast.textbook``'s route, in torch on the same GPU: every row held in float64;
    a Python loop over classes for the means and the D×D within-class covariance; a D×D
    pseudo-inverse; NCC by the explicit squared distance of every row to every class
    mean, class by class; the classifier's logits ``W h + b``.

    Returns
    -------
    nc1, ncc_accuracy, nc4 : float
    """
    features = features.double()
    num_rows, num_features = features.shape
    means = torch.stack([features[labels == c].mean(0) for c in range(num_classes)])
    within = torch.zeros(num_features, num_features, dtype=torch.float64, device=features.device)
    for c in range(num_classes):
        residuals = features[labels == c] - means[c]
        within += residuals.T @ residuals
    within /= num_rows
    centred = means - means.mean(0)
    between = centred.T @ centred / num_classes
    nc1 = torch.trace(within @ torch.linalg.pinv(between, hermitian=True)) / num_classes
    weights = torch.as_tensor(weights, device=features.device)
    bias = torch.as_tensor(bias, device=features.device)
    ncc_hits = disagreements = 0
    for c in range(num_classes):
        rows = features[labels == c]
        sq_distances = torch.stack([((rows - means[k]) ** 2).sum(1) for k in range(num_classes)],
                                   dim=1)
        nearest = sq_distances.argmin(1)
        predicted = (rows @ weights.T + bias).argmax(1)
        ncc_hits += int((nearest == c).sum())
        disagreements += int((nearest != predicted).sum())
    return float(nc1), ncc_hits / num_rows, disagreements / num_rows


def stage_times(cupy, kernels, run):
    """Device time of each ncfast kernel launcher over one call of ``run()``, summed.

    Wraps the launchers of ``ncfast.kernels.cuda`` with CUDA events for the call.

    Returns
    -------
    dict of str to float
        Seconds per launcher name.
    """
    names = ("label_codes", "class_sums", "residuals", "matmul_f32", "epilogue", "add_gram")
    originals = {name: getattr(kernels, name) for name in names}
    records = []

    def with_events(name, launcher):
        def launch(*args, **keywords):
            start, stop = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            launcher(*args, **keywords)
            stop.record()
            records.append((name, start, stop))
        return launch

    for name, launcher in originals.items():
        setattr(kernels, name, with_events(name, launcher))
    try:
        run()
    finally:
        for name, launcher in originals.items():
            setattr(kernels, name, launcher)
    cupy.cuda.Device().synchronize()
    totals = dict.fromkeys(names, 0.0)
    for name, start, stop in records:
        totals[name] += cupy.cuda.get_elapsed_time(start, stop) / 1e3
    return totals


def staging_bandwidth(host_rows, nbytes=2 << 30):
    """Rate of ncfast's pageable-to-pinned staging copy (``STAGING_THREADS`` threads)."""
    from concurrent.futures import ThreadPoolExecutor

    import cupy
    from ncfast.backends.cuda import STAGING_THREADS, parallel_copy
    rows = host_rows[:nbytes // host_rows[0].nbytes]
    pinned = np.frombuffer(cupy.cuda.alloc_pinned_memory(rows.nbytes), rows.dtype,
                           rows.size).reshape(rows.shape)
    with ThreadPoolExecutor(STAGING_THREADS) as pool:
        parallel_copy(pinned, rows, pool)
        start = time.perf_counter()
        parallel_copy(pinned, rows, pool)
        return rows.nbytes / (time.perf_counter() - start)


def progress(message):
    """A measurement as soon as it is taken (the table comes at the end)."""
    print(f"# {message}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--cpu-rows", type=int, default=500_000,
                        help="rows for the CPU backend, scaled linearly to --rows")
    args = parser.parse_args()
    import cupy
    import torch
    from ncfast.backends import cuda as gpu_backend
    from ncfast.kernels import cuda as kernels

    num_rows, num_features, num_classes = args.rows, args.features, args.classes
    device_name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    features, labels, weights, bias = synthetic_features(cupy, num_rows, num_features,
                                                         num_classes)
    keywords = {"weights": weights, "bias": bias}

    copy_rate = copy_bandwidth(cupy)
    upload_rate = host_to_device_bandwidth(cupy)
    gemm_rate = sgemm_rate(cupy, kernels)
    read_bytes = 2 * features.nbytes  # pass 1 and pass 2 each read the rows once
    gemm_flops = 2.0 * num_rows * num_features * 2 * num_classes  # Z = R [M~^T | W^T]
    floor = read_bytes / copy_rate + gemm_flops / gemm_rate
    upload_time = read_bytes / upload_rate

    ncfast.collapse(features[:100_000], labels[:100_000], **keywords)  # compile the kernels
    resident_time, report = timed(cupy, lambda: ncfast.collapse(features, labels, **keywords),
                                  repeats=3)
    lanes, gpu_backend.LANES = gpu_backend.LANES, 1  # one stream: launches do not overlap
    stages = stage_times(cupy, kernels, lambda: ncfast.collapse(features, labels, **keywords))
    gpu_backend.LANES = lanes
    progress(f"resident {resident_time:.4f} s, floor {floor:.4f} s, device time per launcher "
             + ", ".join(f"{name} {seconds:.4f} s" for name, seconds in stages.items()))

    host_features, host_labels = features.get(), labels.get()
    staging_rate = staging_bandwidth(host_features)
    streamed_time, streamed = timed(cupy, lambda: ncfast.collapse(
        host_features, host_labels, device="cuda", **keywords))
    pinned_features = np.frombuffer(cupy.cuda.alloc_pinned_memory(host_features.nbytes),
                                    np.float32, host_features.size).reshape(host_features.shape)
    np.copyto(pinned_features, host_features)
    pinned_time, from_pinned = timed(cupy, lambda: ncfast.collapse(
        pinned_features, host_labels, device="cuda", **keywords))
    progress(f"streamed {streamed_time:.4f} s (page-locked: {pinned_time:.4f} s), copy "
             f"{upload_time:.4f} s, staging {staging_rate / 1e9:.1f} GB/s")

    cpu_rows = min(args.cpu_rows, num_rows)
    cpu_features, cpu_labels = host_features[:cpu_rows], host_labels[:cpu_rows]
    ncfast.collapse(cpu_features[:10_000], cpu_labels[:10_000], device="cpu", **keywords)
    cpu_time, cpu_report = timed(cupy, lambda: ncfast.collapse(
        cpu_features, cpu_labels, device="cpu", **keywords))

    cupy.get_default_memory_pool().free_all_blocks()  # room for the textbook's float64 copy
    torch_features = torch.from_dlpack(features)  # the same GPU memory, no copy
    torch_labels = torch.from_dlpack(labels)
    textbook_time, (nc1, ncc_accuracy, nc4) = timed(cupy, lambda: torch_textbook_nc(
        torch, torch_features, torch_labels, weights, bias, num_classes))

    # nc1 to 1e-5 relative; row fractions to 1e-6 (10 of 10M rows may sit on a near-tie
    # that float32 products and the textbook's float64 distances break differently).
    for name, value, reference, tolerance in (
            ("nc1", report.nc1, nc1, 1e-5 * abs(nc1)),
            ("nc1 streamed", streamed.nc1, report.nc1, 1e-9 * abs(report.nc1)),
            ("nc1 page-locked", from_pinned.nc1, report.nc1, 1e-9 * abs(report.nc1)),
            ("ncc_accuracy", report.ncc_accuracy, ncc_accuracy, 1e-6),
            ("nc4", report.nc4, nc4, 1e-6)):
        assert abs(value - reference) <= tolerance, \
            f"{name}: ncfast {value} vs reference {reference}"

    scaled_cpu = cpu_time * num_rows / cpu_rows
    lines = [
        f"ncfast GPU benchmark on {device_name}: N={num_rows:,} x D={num_features} x "
        f"C={num_classes}, float32, with classifier",
        f"measured in this run: device copy {copy_rate / 1e12:.2f} TB/s (read+write), "
        f"sgemm {gemm_rate / 1e12:.1f} TFLOP/s (8192^3, true fp32), pinned host-to-device "
        f"{upload_rate / 1e9:.1f} GB/s",
        f"floor = {read_bytes / 1e9:.1f} GB / copy rate ({read_bytes / copy_rate * 1e3:.1f} ms)"
        f" + {gemm_flops / 1e12:.2f} TFLOP / sgemm rate ({gemm_flops / gemm_rate * 1e3:.1f} ms)",
        "",
        f"{'route':<44}{'time (s)':>10}{'ratio':>10}  ratio is against",
        f"{'floor (2 reads + GEMM)':<44}{floor:>10.4f}{1.0:>10.2f}  floor",
        f"{'ncfast, resident on the GPU':<44}{resident_time:>10.4f}"
        f"{resident_time / floor:>10.2f}  floor (target <= {RESIDENT_OVER_FLOOR})",
        *[f"{'  device time in ' + name + ' (1 stream)':<44}{seconds:>10.4f}"
          f"{seconds / floor:>10.2f}  floor" for name, seconds in stages.items()],
        f"{'textbook route (ncfast.textbook) in torch':<44}{textbook_time:>10.4f}"
        f"{textbook_time / resident_time:>10.1f}  ncfast resident: speed-up "
        f"(target >= {TEXTBOOK_SPEEDUP:.0f})",
        f"{'host-to-device copy of 2 passes (pinned)':<44}{upload_time:>10.4f}{1.0:>10.2f}"
        "  copy time",
        f"{'  staging 2 passes into pinned memory':<44}{read_bytes / staging_rate:>10.4f}"
        f"{read_bytes / staging_rate / upload_time:>10.2f}  copy time ({staging_rate / 1e9:.1f}"
        " GB/s, pageable to pinned, host threads)",
        f"{'ncfast, streamed from pageable host memory':<44}{streamed_time:>10.4f}"
        f"{streamed_time / upload_time:>10.2f}  copy time (target <= {STREAMED_OVER_COPY})",
        f"{'ncfast, streamed from page-locked memory':<44}{pinned_time:>10.4f}"
        f"{pinned_time / upload_time:>10.2f}  copy time (target <= {STREAMED_OVER_COPY})",
        f"{f'ncfast CPU backend, N={cpu_rows:,} x{num_rows / cpu_rows:g}':<44}"
        f"{scaled_cpu:>10.4f}{scaled_cpu / resident_time:>10.1f}  ncfast resident: "
        f"slow-down (CPU measured {cpu_time:.3f} s on {cpu_rows:,} rows, scaled linearly)",
        "",
        f"nc1 {report.nc1:.6g} (textbook {nc1:.6g}), ncc_accuracy {report.ncc_accuracy:.6f}, "
        f"nc4 {report.nc4:.6f}, cpu-backend nc1 on its rows {cpu_report.nc1:.6g}",
        f"targets: resident <= {RESIDENT_OVER_FLOOR}x floor: "
        f"{'met' if resident_time <= RESIDENT_OVER_FLOOR * floor else 'MISSED'}; "
        f">= {TEXTBOOK_SPEEDUP:.0f}x torch textbook: "
        f"{'met' if textbook_time >= TEXTBOOK_SPEEDUP * resident_time else 'MISSED'}; "
        f"streamed <= {STREAMED_OVER_COPY}x copy: pageable "
        f"{'met' if streamed_time <= STREAMED_OVER_COPY * upload_time else 'MISSED'}, "
        f"page-locked {'met' if pinned_time <= STREAMED_OVER_COPY * upload_time else 'MISSED'}",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
