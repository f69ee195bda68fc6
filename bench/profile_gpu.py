"""``cProfile`` of one ``ncfast.collapse`` call on the GPU, the rows resident or streamed.

The device runs asynchronously, so a launcher's time includes waiting for earlier work
when the launch queue is full; the engine's stages (pass 2's updates, the plan, the end
of pass 2) are still told apart, and so are the streamed path's host stages (staging
into pinned memory, waiting for a buffer). Run on a CUDA machine with CuPy::

    python -m bench.profile_gpu 2000000 256 32768
    python -m bench.profile_gpu 2000000 512 100 --placement pageable
"""
import argparse
import cProfile
import pstats
import time

import numpy as np

import ncfast
from bench.bench_gpu import synthetic_features
from bench.data import positive_int

PLACEMENTS = ("resident", "pageable", "page-locked")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", type=positive_int)
    parser.add_argument("features", type=positive_int)
    parser.add_argument("classes", type=positive_int)
    parser.add_argument("--placement", choices=PLACEMENTS, default="resident",
                        help="where the rows are: on the GPU, or in host memory")
    parser.add_argument("--lines", type=positive_int, default=45, help="profile lines printed")
    args = parser.parse_args()
    import cupy

    features, labels, weights, bias = synthetic_features(cupy, args.rows, args.features,
                                                         args.classes)
    options = {"num_classes": args.classes, "weights": weights, "bias": bias}
    if args.placement != "resident":
        options["device"] = "cuda"
        host_features, labels = features.get(), labels.get()
        del features
        features = host_features
        if args.placement == "page-locked":
            features = np.frombuffer(cupy.cuda.alloc_pinned_memory(host_features.nbytes),
                                     np.float32, host_features.size).reshape(host_features.shape)
            np.copyto(features, host_features)
            del host_features
    ncfast.collapse(features, labels, **options)  # compile the kernels
    cupy.cuda.Device().synchronize()
    start = time.perf_counter()
    ncfast.collapse(features, labels, **options)
    cupy.cuda.Device().synchronize()
    print(f"collapse {time.perf_counter() - start:.3f} s ({args.placement})", flush=True)
    profile = cProfile.Profile()
    profile.enable()
    ncfast.collapse(features, labels, **options)
    cupy.cuda.Device().synchronize()
    profile.disable()
    stats = pstats.Stats(profile)
    stats.sort_stats("cumulative").print_stats(args.lines)
    stats.sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
