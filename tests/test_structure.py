"""The layering rules, checked on the source: no import cycles between ncfast's modules,
and no module reads a private name that another module defines."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: Package directories and the import name of each (``kernels/`` installs as ``ncfast.kernels``).
PACKAGES = {ROOT / "ncfast": "ncfast", ROOT / "kernels": "ncfast.kernels"}

#: Underscore names that are public API of the standard library (named tuples).
NAMEDTUPLE_API = {"_replace", "_fields", "_asdict", "_make"}


def _modules():
    """``{module name: parsed tree}`` of every module of the package."""
    modules = {}
    for directory, package in PACKAGES.items():
        for path in sorted(directory.rglob("*.py")):
            parts = path.relative_to(directory).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((package, *parts))
            modules[name] = ast.parse(path.read_text(), filename=str(path))
    return modules


def _imported_modules(name, tree, known):
    """ncfast modules that module ``name`` imports (anywhere in its body)."""
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            candidates = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        imported.update(candidate for candidate in candidates
                        if candidate in known and candidate != name)
    return imported


def test_no_two_modules_import_each_other():
    modules = _modules()
    graph = {name: _imported_modules(name, tree, modules) for name, tree in modules.items()}
    # A package importing its own submodules (``ncfast/__init__`` re-exporting) is not a
    # cycle of the layers; every other cycle is.
    cycles = []

    def visit(name, path):
        for target in sorted(graph[name]):
            if target in path:
                cycle = path[path.index(target):] + [target]
                if not any(a.startswith(b + ".") or b.startswith(a + ".")
                           for a, b in zip(cycle, cycle[1:])):
                    cycles.append(" -> ".join(cycle))
                continue
            visit(target, path + [target])

    for name in sorted(graph):
        visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(sorted(set(cycles)))


def _private_names_defined(tree):
    """Private names a module defines: functions, classes, module constants and the
    ``self._name`` / ``cls._name`` attributes its classes assign."""
    defined = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            defined.add(node.attr)
    return {name for name in defined if name.startswith("_")}


def test_no_module_reads_another_modules_private_names():
    """``obj._name`` only for names the module defines itself, and no
    ``from module import _name``."""
    offences = []
    for name, tree in _modules().items():
        own = _private_names_defined(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("ncfast"):
                offences += [f"{name}: from {node.module} import {alias.name}"
                             for alias in node.names
                             if alias.name.startswith("_") and not alias.name.startswith("__")]
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and \
                    not node.attr.startswith("__") and node.attr not in NAMEDTUPLE_API and \
                    node.attr not in own:
                offences.append(f"{name}:{node.lineno}: .{node.attr}")
    assert not offences, "private names read across modules:\n" + "\n".join(offences)


def test_device_states_take_the_host_states_arguments():
    """The engine adds chunks into either backend's states with one call: the CUDA
    backend's states (imported without CuPy) take the CPU states' parameters."""
    import inspect

    from ncfast.accumulators import ClassSums, ResidualStats
    from ncfast.backends import cpu, cuda

    for host, device in ((ClassSums.update, cuda.DeviceClassSums.update),
                         (ResidualStats.update, cuda.DeviceResidualStats.update)):
        assert inspect.signature(host) == inspect.signature(device), device.__qualname__
    for name in ("source", "pass1_state", "finish_pass1", "pass2_states", "finish_pass2",
                 "map_tasks", "reduce_tile"):
        host_parameters = list(inspect.signature(getattr(cpu.CpuBackend, name)).parameters)
        device_parameters = list(inspect.signature(getattr(cuda.CudaBackend, name)).parameters)
        assert [p for p in host_parameters if p != "self"] == \
            [p for p in device_parameters if p != "self"], name
