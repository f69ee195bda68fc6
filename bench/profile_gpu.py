"""``cProfile`` of one ``ncfast.collapse`` call with the features resident on the GPU.

The device runs asynchronously, so a launcher's time includes waiting for earlier work
when the launch queue is full; the engine's stages (pass 2's updates, the plan, the end
of pass 2) are still told apart. Run on a CUDA machine with CuPy::

    python -m bench.profile_gpu 2000000 256 32768
"""
import argparse
import cProfile
import pstats
import time

import ncfast
from bench.bench_gpu import synthetic_features


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", type=int)
    parser.add_argument("features", type=int)
    parser.add_argument("classes", type=int)
    parser.add_argument("--lines", type=int, default=45, help="profile lines printed")
    args = parser.parse_args()
    import cupy

    features, labels, weights, bias = synthetic_features(cupy, args.rows, args.features,
                                                         args.classes)
    options = {"num_classes": args.classes, "weights": weights, "bias": bias}
    ncfast.collapse(features, labels, **options)  # compile the kernels
    cupy.cuda.Device().synchronize()
    start = time.perf_counter()
    ncfast.collapse(features, labels, **options)
    cupy.cuda.Device().synchronize()
    print(f"collapse {time.perf_counter() - start:.3f} s", flush=True)
    profile = cProfile.Profile()
    profile.enable()
    ncfast.collapse(features, labels, **options)
    cupy.cuda.Device().synchronize()
    profile.disable()
    pstats.Stats(profile).sort_stats("cumulative").print_stats(args.lines)


if __name__ == "__main__":
    main()
