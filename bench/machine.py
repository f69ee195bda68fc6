"""Where the benchmarks write their results, and what a result file records about the machine
it ran on."""
import datetime
import importlib.metadata
import os
import pathlib
import platform

import numba
import numpy as np
import psutil
import threadpoolctl

import ncfast

#: The folder the benchmarks write their results into.
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def machine_facts():
    """CPU, cores, memory, library versions and BLAS threads of this machine, JSON-safe."""
    cpu_model = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            cpu_model = next((line.split(":", 1)[1].strip() for line in cpuinfo
                              if line.startswith("model name")), cpu_model)
    return {
        "cpu": cpu_model,
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_bytes": psutil.virtual_memory().total,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_threads": numba.get_num_threads(),
        # Its version without importing it: the benchmarks' worker processes import this
        # module, and torch would add to the peak memory they report.
        "torch": importlib.metadata.version("torch"),
        "ncfast": ncfast.__version__,
        "blas": threadpoolctl.threadpool_info(),
        "openblas_env": {name: value for name, value in os.environ.items()
                         if name.startswith("OPENBLAS")},
    }


def utc_stamp():
    """The time now in UTC as ``20261122T194640Z``, for result file names."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def result_path(name):
    """``RESULTS/<name>-<UTC time>.json``, the folder created if need be (a chart beside it
    takes the same name with ``.png``).

    Returns
    -------
    pathlib.Path
    """
    RESULTS.mkdir(exist_ok=True)
    return RESULTS / f"{name}-{utc_stamp()}.json"
