"""Peak memory of one route beyond its input, measured in a fresh process.

Run as ``python -m bench.memory ROUTE N D C [--classifier]``: it builds the
input, warms the JIT on a slice, resets the kernel's record of peak resident
memory (``/proc/self/clear_refs``), runs the route once and prints, as JSON,
the peak resident bytes beyond those held before the run (the input
included). ``peak_extra_bytes`` runs it and parses the answer.
"""
import argparse
import contextlib
import json
import subprocess
import sys

from bench.data import collapsed_features, positive_int
from bench.routes import ROUTES, WARM_ROWS, thread_limit


def _status_bytes(field):
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def resident_memory():
    """Resident bytes of this process now (Linux)."""
    return _status_bytes("VmRSS")


def reset_peak_memory():
    """Restart the kernel's record of this process's peak resident memory (Linux)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_memory():
    """Peak resident bytes of this process since the last ``reset_peak_memory``."""
    return _status_bytes("VmHWM")


def peak_extra_bytes(route, num_rows, num_features, num_classes, classifier, threads=None):
    """Peak resident bytes beyond the input while ``route`` runs, from a subprocess."""
    command = [sys.executable, "-m", "bench.memory", route, str(num_rows), str(num_features),
               str(num_classes)] + (["--classifier"] if classifier else [])
    if threads:
        command += ["--threads", str(threads)]
    answer = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(answer.stdout.splitlines()[-1])["peak_extra_bytes"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("route", choices=tuple(ROUTES))
    parser.add_argument("rows", type=positive_int)
    parser.add_argument("features", type=positive_int)
    parser.add_argument("classes", type=positive_int)
    parser.add_argument("--classifier", action="store_true")
    parser.add_argument("--threads", type=positive_int)
    args = parser.parse_args(argv)
    with thread_limit(args.threads) if args.threads else contextlib.nullcontext():
        features, labels, weights, bias = collapsed_features(
            args.rows, args.features, args.classes, classifier=args.classifier)
        run = ROUTES[args.route]
        warm = min(args.rows, WARM_ROWS)
        run(features[:warm], labels[:warm], args.classes, weights, bias)
        before = resident_memory()
        reset_peak_memory()
        run(features, labels, args.classes, weights, bias)
        peak = peak_memory()
    print(json.dumps({"route": args.route, "input_bytes": features.nbytes,
                      "rss_before_bytes": before, "peak_extra_bytes": peak - before}))


if __name__ == "__main__":
    main()
