"""Every CUDA kernel compiles for sm_90 with nvcc, on machines without a GPU.

The source and its instantiations are read out of ``kernels/cuda.py`` with
``ast`` (importing it would import CuPy); each instantiation is referenced
from a table so that nvcc compiles it. Warnings are errors. Skipped only when
nvcc is absent. At run time CuPy compiles the same text with NVRTC, which
lacks the host headers nvcc includes (no ``HUGE_VAL``, say): the GPU tests
(tests/test_cuda.py) cover that compile.
"""
import ast
import pathlib
import shutil
import subprocess

import pytest

KERNELS_FILE = pathlib.Path(__file__).resolve().parents[1] / "kernels" / "cuda.py"


def _module_constants(path, names):
    """Values of the module-level constants ``names`` of a Python file, without importing it."""
    tree = ast.parse(path.read_text())
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and \
                isinstance(node.targets[0], ast.Name) and node.targets[0].id in names:
            values[node.targets[0].id] = node.value
    return values


def _name_expressions(node):
    """Evaluate the NAME_EXPRESSIONS expression (comprehensions over string literals)."""
    return eval(compile(ast.Expression(node), str(KERNELS_FILE), "eval"), {})  # noqa: S307


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_every_kernel_compiles_for_sm90(tmp_path):
    constants = _module_constants(KERNELS_FILE, {"CUDA_SOURCE", "NAME_EXPRESSIONS"})
    source = ast.literal_eval(constants["CUDA_SOURCE"])
    names = _name_expressions(constants["NAME_EXPRESSIONS"])
    assert names, "NAME_EXPRESSIONS lists no kernel"
    table = ", ".join(f"(void*)&{name}" for name in names)
    unit = tmp_path / "ncfast_kernels.cu"
    unit.write_text(f"{source}\nvoid* ncfast_instances[] = {{{table}}};\n")
    result = subprocess.run(
        ["nvcc", "-arch=sm_90", "-std=c++17", "-Werror", "all-warnings", "-c", str(unit),
         "-o", str(tmp_path / "ncfast_kernels.o")],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cuda_residual_limit_is_the_cpu_one():
    """The CUDA source spells out the row-size limit the CPU kernels take from Python."""
    from ncfast.kernels.cpu import MAX_RESIDUAL_SQ_NORM

    source = ast.literal_eval(_module_constants(KERNELS_FILE, {"CUDA_SOURCE"})["CUDA_SOURCE"])
    defined = [line.split()[2] for line in source.splitlines()
               if line.startswith("#define NCFAST_MAX_RESIDUAL_SQ_NORM ")]
    assert [float(value) for value in defined] == [MAX_RESIDUAL_SQ_NORM]
