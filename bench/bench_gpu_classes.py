"""GPU, many classes: ncfast against the torch accumulator route on the same GPU, one run.

N × D × C float32 with a classifier (default 2,000,000 × 256 × 32,768, the engine
issue's GPU shape), features resident on the GPU for both. The torch route is
``bench.torch_route`` with its GEMM distances (the library's own formula, the faster
of its two variants), run on the GPU. Prints each time, the speedup, and the metrics
both compute, so that the two are seen to measure the same thing::

    python -m bench.bench_gpu_classes
    python -m bench.bench_gpu_classes --rows 200000 --classes 4096   # quicker
"""
import argparse
import time

import ncfast
from bench.bench_gpu import synthetic_features, timed
from bench.torch_route import torch_collapse

#: Metrics both routes compute.
SHARED_METRICS = ("nc1", "nc1_trace", "cdnv", "ncc_accuracy", "nc4", "accuracy")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--classes", type=int, default=32_768)
    args = parser.parse_args()
    import cupy
    import torch

    num_classes = args.classes
    features, labels, weights, bias = synthetic_features(cupy, args.rows, args.features,
                                                         num_classes)
    options = {"num_classes": num_classes, "weights": weights, "bias": bias}
    warm_rows = min(args.rows, 200_000)
    ncfast.collapse(features[:warm_rows], labels[:warm_rows], empty_classes="ignore", **options)
    ncfast_seconds, report = timed(cupy, lambda: ncfast.collapse(features, labels, **options),
                                   repeats=2)
    print(f"# ncfast {ncfast_seconds:.3f} s", flush=True)

    # Warm-up on few classes: a slice of rows leaves classes empty, whose NaN means break
    # the route's pseudo-inverse.
    torch_collapse(features[:warm_rows], labels[:warm_rows] % 64, num_classes=64, ncc="gemm",
                   device="cuda", weights=weights[:64], bias=bias[:64])
    torch.cuda.synchronize()
    start = time.perf_counter()
    peer = torch_collapse(features, labels, ncc="gemm", device="cuda", **options)
    torch.cuda.synchronize()
    peer_seconds = time.perf_counter() - start
    device = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"{args.rows:,} x {args.features} x {num_classes:,} with a classifier on {device}")
    print(f"{'route':<34}{'seconds':>10}")
    print(f"{'ncfast (features on the GPU)':<34}{ncfast_seconds:>10.3f}")
    print(f"{'torch accumulator route (GEMM NCC)':<34}{peer_seconds:>10.3f}")
    print(f"ncfast is {peer_seconds / ncfast_seconds:.1f}x faster")
    print(f"{'metric':<14}{'ncfast':>16}{'torch route':>16}")
    for name in SHARED_METRICS:
        print(f"{name:<14}{getattr(report, name):>16.6g}{peer[name]:>16.6g}")


if __name__ == "__main__":
    main()
