"""``python -m bench.bench_gpu``: the GPU backend against its floor and the torch routes.

Issue 14. On a CUDA machine with CuPy and torch, in one run, float32 rows with a
classifier (``synthetic_features``: class means of scale 3, unit spread, ``W`` near the
means), for each **resident** shape (features on the GPU):

- **ncfast**: ``ncfast.collapse`` on the device arrays, best of ``--repeats``, and the
  device time of each of its kernel launchers over one more call (one stream);
- **floor**: both passes read the rows (``N·D·4`` bytes each) at the device-to-device
  copy rate, plus the flops the route cannot avoid. "classes" route (C' ≤ D):
  ``2·N·D·(C' + C)``, the NC1 projection and the logits, at the true-float32 sgemm
  rate. "features" route (C' > D): NC1's float64 D×D scatter ``N·D²`` and the pair
  sweep's float64 Gram ``C'²·D`` at the float64 GEMM rate (the NCC and classifier
  GEMM of rows beyond their radii depends on the data and is not counted). Rates are
  those of 8192³ products measured in this run;
- **torch accumulator route**: ``bench.torch_route.torch_collapse(..., ncc="gemm")``,
  the public torch library's pipeline written from its description, on the same GPU
  and the same device arrays, with the metrics both compute side by side;
- **torch textbook route** (``torch_textbook_nc``, only up to ``--textbook-classes``
  classes: its Python loops over class pairs grow as C²).

For each **streamed** shape: the same rows from pageable host memory and from
page-locked memory (``device="cuda"``) against the host-to-device copy of both passes'
bytes at the pinned copy rate of this run, and the pageable-to-pinned staging rate.

Prints the table, and writes it with the rates to ``--json`` (default
``bench/results/gpu-<UTC time>.json``)::

    python -m bench.bench_gpu                      # the GPU grid's shapes
    python -m bench.bench_gpu --resident 2e6x512x100 --streamed 2e6x512x100   # quicker
"""
import argparse
import gc
import sys
import time

import numpy as np

import ncfast
from bench.data import positive_int
from bench.machine import result_path
from bench.suite import parse_sizes
from bench.torch_route import torch_collapse
from ncfast.dumps import write_json_atomically
from ncfast.geometry import route_for

#: Issue 14's shapes, rows × D × C.
RESIDENT_SHAPES = "1e7x512x100,2e6x2048x1000,2e6x256x32768"
STREAMED_SHAPES = "1e7x512x100,2e6x2048x1000"

#: Issue 14's targets: ncfast/floor by resident shape, ncfast's lead over the torch
#: accumulator route by shape, and ncfast/copy time streamed.
FLOOR_TARGETS = {(10_000_000, 512, 100): 1.3, (2_000_000, 2048, 1000): 1.5}
TORCH_TARGETS = {(10_000_000, 512, 100): 5.0, (2_000_000, 2048, 1000): 5.0,
                 (2_000_000, 256, 32_768): 10.0}
STREAMED_TARGETS = {"pageable": 1.3, "page-locked": 1.1}

#: Metrics that both ncfast and the torch routes compute.
SHARED_METRICS = ("nc1", "nc1_trace", "cdnv", "ncc_accuracy", "nc4", "accuracy")

#: Kernel launchers whose device time ``stage_times`` reports.
LAUNCHERS = ("label_codes", "class_sums", "residuals", "matmul_f32", "epilogue", "add_gram")


def synthetic_features(cupy, num_rows, num_features, num_classes, seed=0):
    """Gaussian class clouds on the GPU (float32), with a classifier near the means.

    Returns
    -------
    features : cupy float32 array of shape (N, D)
    labels : cupy int64 array of shape (N,)
    weights : float64 array of shape (C, D)
    bias : float64 array of shape (C,)
    """
    rng = cupy.random.default_rng(seed)
    class_means = 3.0 * rng.standard_normal((num_classes, num_features), dtype=cupy.float32)
    labels = rng.integers(0, num_classes, num_rows, dtype=cupy.int64)
    features = cupy.empty((num_rows, num_features), cupy.float32)
    block = 1 << 20
    for start in range(0, num_rows, block):
        stop = min(start + block, num_rows)
        features[start:stop] = class_means[labels[start:stop]] + rng.standard_normal(
            (stop - start, num_features), dtype=cupy.float32)
    weights = class_means + 0.3 * rng.standard_normal(class_means.shape, dtype=cupy.float32)
    bias = 0.1 * rng.standard_normal(num_classes, dtype=cupy.float32)
    return features, labels, weights.get().astype(np.float64), bias.get().astype(np.float64)


def timed(cupy, function, repeats=1):
    """Best wall-clock time of ``function()`` (the device idle before and after), and its
    last result."""
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
    return 2 * nbytes / event_time(cupy, lambda: target.__setitem__(Ellipsis, source))


def host_to_device_bandwidth(cupy, nbytes=2 << 30):
    """Pinned host-to-device copy rate, bytes per second."""
    pinned = np.frombuffer(cupy.cuda.alloc_pinned_memory(nbytes), np.uint8, nbytes)
    pinned[:] = 1
    target = cupy.empty(nbytes, cupy.uint8)
    runtime = cupy.cuda.runtime
    return nbytes / event_time(cupy, lambda: runtime.memcpyAsync(
        target.data.ptr, pinned.ctypes.data, nbytes, runtime.memcpyHostToDevice,
        cupy.cuda.get_current_stream().ptr))


def gemm_rates(cupy, kernels, size=8192):
    """True-float32 (ncfast's own cuBLAS call) and float64 GEMM rates, flop/s."""
    rng = cupy.random.default_rng(1)
    single = rng.standard_normal((size, size), dtype=cupy.float32)
    out = cupy.empty((size, size), cupy.float32)
    kernels.matmul_f32(single, single, out)
    sgemm = 2.0 * size ** 3 / event_time(cupy, lambda: kernels.matmul_f32(single, single, out))
    double = single.astype(cupy.float64)
    product = cupy.empty((size, size))
    dgemm = 2.0 * size ** 3 / event_time(cupy, lambda: cupy.matmul(double, double, out=product))
    return sgemm, dgemm


def staging_bandwidth(cupy, host_rows, nbytes=2 << 30):
    """Rate of ncfast's pageable-to-pinned staging copy (``STAGING_THREADS`` threads)."""
    from concurrent.futures import ThreadPoolExecutor

    from ncfast.backends.cuda import STAGING_THREADS, parallel_copy
    rows = host_rows[:max(1, nbytes // host_rows[0].nbytes)]
    pinned = np.frombuffer(cupy.cuda.alloc_pinned_memory(rows.nbytes), rows.dtype,
                           rows.size).reshape(rows.shape)
    with ThreadPoolExecutor(STAGING_THREADS) as pool:
        parallel_copy(pinned, rows, pool)
        start = time.perf_counter()
        parallel_copy(pinned, rows, pool)
        return rows.nbytes / (time.perf_counter() - start)


def floor_seconds(shape, rates):
    """The floor of a resident shape (module docstring) and what it counts."""
    num_rows, num_features, num_classes = shape
    read = 2 * 4 * num_rows * num_features / rates["copy"]
    if route_for(num_classes, num_features) == "classes":
        flops = 2.0 * num_rows * num_features * 2 * num_classes
        return read + flops / rates["sgemm"], f"2 reads + {flops / 1e12:.2f} TFLOP fp32"
    flops = float(num_rows) * num_features ** 2 + float(num_classes) ** 2 * num_features
    return read + flops / rates["dgemm"], f"2 reads + {flops / 1e12:.2f} TFLOP fp64"


def stage_times(cupy, kernels, run):
    """Device time of each ncfast kernel launcher over one call of ``run()``, summed.

    Wraps the launchers of ``ncfast.kernels.cuda`` with CUDA events for the call, with
    pass 2 on one stream (``ncfast.backends.cuda.LANES = 1``): the events of two streams
    would each count the other's kernels that run between them.

    Returns
    -------
    dict of str to float
        Seconds per launcher name.
    """
    from ncfast.backends import cuda as backend
    originals = {name: getattr(kernels, name) for name in LAUNCHERS}
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
    lanes, backend.LANES = backend.LANES, 1
    try:
        run()
    finally:
        backend.LANES = lanes
        for name, launcher in originals.items():
            setattr(kernels, name, launcher)
    cupy.cuda.Device().synchronize()
    totals = dict.fromkeys(LAUNCHERS, 0.0)
    for name, start, stop in records:
        totals[name] += cupy.cuda.get_elapsed_time(start, stop) / 1e3
    return totals


def torch_textbook_nc(torch, features, labels, weights, bias, num_classes):
    """``ncfast.textbook``'s route, in torch on the same GPU: every row held in float64;
    a Python loop over classes for the means and the D×D within-class covariance; a D×D
    pseudo-inverse; NCC by the explicit squared distance of every row to every class
    mean, class by class; the classifier's logits ``W h + b``.

    Returns
    -------
    dict
        ``nc1``, ``ncc_accuracy``, ``nc4``.
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
    return {"nc1": float(nc1), "ncc_accuracy": ncc_hits / num_rows,
            "nc4": disagreements / num_rows}


def progress(message):
    """A measurement as soon as it is taken (the table comes at the end)."""
    print(f"# {message}", flush=True)


def free_memory(cupy, torch):
    """Give the device memory of finished measurements back (both allocators)."""
    gc.collect()
    cupy.get_default_memory_pool().free_all_blocks()
    cupy.get_default_pinned_memory_pool().free_all_blocks()
    torch.cuda.empty_cache()


def measure_resident(cupy, torch, kernels, shape, rates, args):
    """One resident shape: ncfast, its launchers, the floor and the torch routes."""
    num_rows, num_features, num_classes = shape
    features, labels, weights, bias = synthetic_features(cupy, *shape)
    options = {"num_classes": num_classes, "weights": weights, "bias": bias}
    warm_rows = min(num_rows, 200_000)
    ncfast.collapse(features[:warm_rows], labels[:warm_rows], empty_classes="ignore", **options)
    seconds, report = timed(cupy, lambda: ncfast.collapse(features, labels, **options),
                            repeats=args.repeats)
    stages = stage_times(cupy, kernels, lambda: ncfast.collapse(features, labels, **options))
    floor, floor_counts = floor_seconds(shape, rates)
    progress(f"{shape}: ncfast {seconds:.4f} s, floor {floor:.4f} s ({floor_counts})")

    # Warm-up on few classes: a slice of rows leaves classes empty, whose NaN means break
    # the route's pseudo-inverse.
    torch_collapse(features[:warm_rows], labels[:warm_rows] % 64, num_classes=64, ncc="gemm",
                   device="cuda", weights=weights[:64], bias=bias[:64])
    torch_seconds, peer = timed(cupy, lambda: torch_collapse(
        features, labels, ncc="gemm", device="cuda", **options))
    progress(f"{shape}: torch accumulator route {torch_seconds:.3f} s")
    textbook_seconds = textbook = None
    if num_classes <= args.textbook_classes:
        torch_features, torch_labels = torch.from_dlpack(features), torch.from_dlpack(labels)
        textbook_seconds, textbook = timed(cupy, lambda: torch_textbook_nc(
            torch, torch_features, torch_labels, weights, bias, num_classes))
        progress(f"{shape}: torch textbook route {textbook_seconds:.3f} s")
    row = {"shape": list(shape), "route": route_for(num_classes, num_features),
           "ncfast_seconds": seconds, "floor_seconds": floor, "floor_counts": floor_counts,
           "launcher_seconds": stages, "torch_seconds": torch_seconds,
           "textbook_seconds": textbook_seconds,
           "metrics": {"ncfast": {name: getattr(report, name) for name in SHARED_METRICS},
                       "torch": {name: peer.get(name) for name in SHARED_METRICS},
                       "textbook": textbook}}
    streamed = None
    if shape in args.streamed:
        streamed = measure_streamed(cupy, features, labels, options, report, rates)
    return row, streamed


def measure_streamed(cupy, features, labels, options, resident_report, rates):
    """The resident shape's rows streamed from pageable and from page-locked host memory."""
    host_features, host_labels = features.get(), labels.get()
    staging = staging_bandwidth(cupy, host_features)
    copy_seconds = 2 * host_features.nbytes / rates["upload"]
    pageable_seconds, pageable = timed(cupy, lambda: ncfast.collapse(
        host_features, host_labels, device="cuda", **options))
    pinned = np.frombuffer(cupy.cuda.alloc_pinned_memory(host_features.nbytes), np.float32,
                           host_features.size).reshape(host_features.shape)
    np.copyto(pinned, host_features)
    pinned_seconds, page_locked = timed(cupy, lambda: ncfast.collapse(
        pinned, host_labels, device="cuda", **options))
    for name, report in (("pageable", pageable), ("page-locked", page_locked)):
        assert abs(report.nc1 - resident_report.nc1) <= 1e-7 * abs(resident_report.nc1), \
            f"nc1 streamed from {name} memory {report.nc1} vs resident {resident_report.nc1}"
    shape = list(features.shape) + [options["num_classes"]]
    progress(f"{shape} streamed: pageable {pageable_seconds:.3f} s, page-locked "
             f"{pinned_seconds:.3f} s, copy {copy_seconds:.3f} s, staging {staging / 1e9:.1f} "
             "GB/s")
    return {"shape": shape, "copy_seconds": copy_seconds, "staging_bytes_per_second": staging,
            "pageable_seconds": pageable_seconds, "page_locked_seconds": pinned_seconds}


def shape_label(shape):
    return " × ".join(f"{size:,}" for size in shape)


def verdict(value, limit, higher_is_better=False):
    if limit is None:
        return ""
    met = value >= limit if higher_is_better else value <= limit
    return f" ({'met' if met else 'MISSED'}: {'≥' if higher_is_better else '≤'} {limit:g})"


def render(device_name, rates, resident, streamed):
    """The table, as lines of text."""
    lines = [
        f"ncfast on {device_name}: float32 rows with a classifier, one run",
        f"rates measured in this run: device copy {rates['copy'] / 1e12:.2f} TB/s (read+write),"
        f" sgemm {rates['sgemm'] / 1e12:.1f} TFLOP/s (true fp32), dgemm "
        f"{rates['dgemm'] / 1e12:.1f} TFLOP/s, pinned host-to-device "
        f"{rates['upload'] / 1e9:.1f} GB/s", "",
        f"{'resident shape (N × D × C)':<28}{'route':<10}{'ncfast s':>10}{'floor s':>10}"
        f"{'× floor':>10}{'torch s':>10}{'torch ×':>10}{'textbook ×':>12}",
    ]
    for row in resident:
        shape = tuple(row["shape"])
        over_floor = row["ncfast_seconds"] / row["floor_seconds"]
        lead = row["torch_seconds"] / row["ncfast_seconds"]
        textbook = "" if row["textbook_seconds"] is None else \
            f"{row['textbook_seconds'] / row['ncfast_seconds']:.1f}"
        lines.append(f"{shape_label(shape):<28}{row['route']:<10}{row['ncfast_seconds']:>10.4f}"
                     f"{row['floor_seconds']:>10.4f}{over_floor:>10.2f}"
                     f"{row['torch_seconds']:>10.3f}{lead:>10.1f}{textbook:>12}")
    lines += ["", "targets:"]
    for row in resident:
        shape = tuple(row["shape"])
        over_floor = row["ncfast_seconds"] / row["floor_seconds"]
        lead = row["torch_seconds"] / row["ncfast_seconds"]
        lines.append(f"  {shape_label(shape)}: {over_floor:.2f}× floor"
                     f"{verdict(over_floor, FLOOR_TARGETS.get(shape))}, {lead:.1f}× faster than "
                     f"the torch accumulator route{verdict(lead, TORCH_TARGETS.get(shape), True)}"
                     f"; floor = {row['floor_counts']}")
    for row in streamed:
        for kind, key in (("pageable", "pageable_seconds"), ("page-locked", "page_locked_seconds")):
            ratio = row[key] / row["copy_seconds"]
            lines.append(f"  {shape_label(row['shape'])} streamed from {kind} memory: "
                         f"{row[key]:.3f} s = {ratio:.2f}× the copy of both passes "
                         f"({row['copy_seconds']:.3f} s){verdict(ratio, STREAMED_TARGETS[kind])}")
        lines.append(f"    staging into pinned memory: "
                     f"{row['staging_bytes_per_second'] / 1e9:.1f} GB/s")
    lines += ["", "launcher device time (s, one more call, one stream):",
              f"{'shape':<28}" + "".join(f"{name:>12}" for name in LAUNCHERS)]
    for row in resident:
        lines.append(f"{shape_label(row['shape']):<28}" + "".join(
            f"{row['launcher_seconds'][name]:>12.4f}" for name in LAUNCHERS))
    lines += ["", "metrics both compute (ncfast / torch accumulator route / textbook):"]
    for row in resident:
        metrics = row["metrics"]
        lines.append(f"  {shape_label(row['shape'])}: " + ", ".join(
            f"{name} {metrics['ncfast'][name]:.6g} / {_number(metrics['torch'][name])}"
            + ("" if not metrics["textbook"] or name not in metrics["textbook"]
               else f" / {metrics['textbook'][name]:.6g}")
            for name in SHARED_METRICS))
    return lines


def _number(value):
    return "-" if value is None else f"{value:.6g}"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.bench_gpu",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--resident", type=parse_sizes, default=parse_sizes(RESIDENT_SHAPES),
                        help=f"comma-separated NxDxC (default {RESIDENT_SHAPES})")
    parser.add_argument("--streamed", type=parse_sizes, default=parse_sizes(STREAMED_SHAPES),
                        help="resident shapes also streamed from host memory "
                             f"(default {STREAMED_SHAPES})")
    parser.add_argument("--repeats", type=positive_int, default=2,
                        help="ncfast runs per shape (best)")
    parser.add_argument("--textbook-classes", type=positive_int, default=128,
                        help="run the torch textbook route up to this many classes")
    parser.add_argument("--json", help="result file (default bench/results/gpu-<UTC time>.json)")
    args = parser.parse_args(argv)
    import cupy
    import torch

    from ncfast.kernels import cuda as kernels

    device_name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    sgemm, dgemm = gemm_rates(cupy, kernels)
    rates = {"copy": copy_bandwidth(cupy), "upload": host_to_device_bandwidth(cupy),
             "sgemm": sgemm, "dgemm": dgemm}
    free_memory(cupy, torch)
    progress(", ".join(f"{name} {rate:.4g}" for name, rate in rates.items()))
    resident, streamed = [], []
    for shape in args.resident:
        row, streamed_row = measure_resident(cupy, torch, kernels, shape, rates, args)
        free_memory(cupy, torch)  # the shape's arrays went with measure_resident's frame
        resident.append(row)
        if streamed_row is not None:
            streamed.append(streamed_row)
    lines = render(device_name, rates, resident, streamed)
    print("\n".join(lines))
    path = args.json or str(result_path("gpu"))
    write_json_atomically(path, {"device": device_name, "rates": rates, "resident": resident,
                                 "streamed": streamed, "table": lines,
                                 "command": ["python", "-m", "bench.bench_gpu",
                                             *(sys.argv[1:] if argv is None else argv)]})
    print(f"written {path}")


if __name__ == "__main__":
    main()
