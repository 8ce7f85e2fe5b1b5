"""The package's architecture, read from its imports: no cycle, data flows one way, jobs know nothing of Ray."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "mgd_ray"

# Data flows one way: a module imports only from its own layer or the layers before it.
LAYERS = [
    ("config", "distributed", "files"),
    ("data",),
    ("models",),
    ("losses", "metrics", "checkpoint"),
    ("teachers", "teacher_cache"),
    ("jobs",),
    ("ray_connect", "train", "tracking", "plots", "final_eval", "predict", "export", "serving"),
    ("study",),
    ("cli", "__main__", "testing"),  # testing: the tests' and benchmarks' local services
]
# Plain functions of a config that run under Ray Train, torchrun or a test alike.
RAY_FREE = (
    "config",
    "distributed",
    "files",
    "data",
    "models",
    "losses",
    "metrics",
    "checkpoint",
    "teachers",
    "teacher_cache",
    "jobs",
    "study.config",
    "study.plan",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports (at the top or inside functions), relative to its package or absolute."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def internal_imports(name: str) -> set[str]:
    """The mgd_ray modules ``name`` imports (``from mgd_ray.x import y`` counts y when y is a module)."""
    out = set()
    for target in imports(MODULES[name]):
        if target.startswith("mgd_ray."):
            target = target.removeprefix("mgd_ray.")
            if target in MODULES and target != name:
                out.add(target)
    return out


def layer(name: str) -> int:
    top = name.split(".")[0]
    return next(i for i, members in enumerate(LAYERS) if top in members)


def test_every_module_has_a_layer():
    assert {name.split(".")[0] for name in MODULES if name} <= {m for members in LAYERS for m in members}


def test_no_import_cycle():
    graph = {name: internal_imports(name) for name in MODULES}
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n))
def test_imports_flow_one_way(name):
    later = sorted(t for t in internal_imports(name) if layer(t) > layer(name))
    assert not later, f"mgd_ray.{name} imports from later layers: {later}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n and n.startswith(RAY_FREE)))
def test_jobs_and_what_they_use_import_no_ray(name):
    assert not [t for t in imports(MODULES[name]) if t == "ray" or t.startswith("ray.")]


def test_the_checks_see_real_imports():
    """The parser finds top-level and function-local imports (guards against a test that checks nothing)."""
    assert {"jobs.loop", "teachers", "data.stream"} <= internal_imports("jobs.distill")
    assert "ray.tune" in imports(MODULES["study.trial"]) and "train" in internal_imports("study.trial")
    assert layer("jobs.distill") > layer("teachers") > layer("losses") > layer("data.stream")


def test_every_package_folder_is_a_package():
    """setuptools installs only folders with an ``__init__.py``: a namespace folder imports here and is missing from the wheel."""
    folders = {p.parent for p in PACKAGE.rglob("*.py")}
    assert folders and all((folder / "__init__.py").is_file() for folder in folders)
