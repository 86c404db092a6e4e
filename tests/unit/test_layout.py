"""The layout's rules, checked on the code's own imports: which package may import which, no circles,
seams that import no implementation, a control plane free of torch / Ray / UCX / gRPC, third-party
libraries kept to the packages they belong to, and no module over 500 lines.

Every import statement counts, at module level or inside a function (a lazy import is still a
dependency), ``if TYPE_CHECKING:`` ones included for the layering; importing ``a.b.c`` also imports
the packages ``a`` and ``a.b``. Nothing is imported here: the source is parsed.

The packages, lowest first (an arrow may only point down this list, never up or sideways)::

    engine, proto              model code (forward pass, kernels, scheduler, block hash); gRPC stubs
    kv_transfer, memory_tiers  moving KV between processes; G2 / G3 below an engine's G1
    pool_runtime               what both pools share: handoff messages, worker runtime, actor glue
    prefill_pool, decode_pool  the two kinds of worker (neither imports the other)
    router                     the front door, routing, the coordinator driving both pools
    deploy                     the composition root: configuration, building the pools, commands
    benchmarks                 tandem bench ... (nothing imports them)
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 500
_LIBRARY = ("engine", "proto", "kv_transfer", "memory_tiers", "pool_runtime", "prefill_pool", "decode_pool")

# package -> the packages it may import (besides itself)
ALLOWED: dict[str, frozenset[str]] = {
    "engine": frozenset(),
    "proto": frozenset(),
    "kv_transfer": frozenset({"engine"}),
    "memory_tiers": frozenset({"engine"}),
    "pool_runtime": frozenset({"engine", "kv_transfer", "memory_tiers"}),
    "prefill_pool": frozenset({"engine", "kv_transfer", "memory_tiers", "pool_runtime"}),
    "decode_pool": frozenset({"engine", "kv_transfer", "memory_tiers", "pool_runtime"}),
    "router": frozenset({"engine", "kv_transfer", "memory_tiers", "pool_runtime", "proto"}),
    "deploy": frozenset({*_LIBRARY, "router"}),
    "benchmarks": frozenset({*_LIBRARY, "router", "deploy"}),
}

# A seam (a Protocol and its data types) imports none of the implementations behind it: their
# factories live apart (kv_transfer/factory.py, engine/attention_backends.py, memory_tiers/engine_tiers.py).
SEAMS: dict[str, tuple[str, ...]] = {
    "kv_transfer.transport": ("kv_transfer.",),  # no backend, nothing else of the package
    "engine.attention": ("engine.kernels", "engine.attention_backends"),
    "engine.tiers": ("memory_tiers",),
    "memory_tiers.device_pool": ("memory_tiers.tier_store", "memory_tiers.engine_tiers"),
    "memory_tiers.metadata": ("memory_tiers.redis_metadata",),
    "router.backend": ("router.engine_backend", "router.pools_backend"),
}

# The control plane and the pools' messages: plain Python on integers and dataclasses (STYLE.md),
# importable and testable without torch, Ray, UCX or gRPC, even through what they import.
PURE = (
    "engine.block_hash",
    "engine.block_manager",
    "engine.scheduler",
    "engine.sequence",
    "engine.sampling_params",
    "engine.tp_layout",
    "kv_transfer.heads",
    "memory_tiers.slot_index",
    "memory_tiers.metadata",
    "pool_runtime.handoff",
    "pool_runtime.reports",
    "router.cost_model",
    "router.policies",
    "router.topology",
    "router.routing",
    "router.coordinator",
    "deploy.config",
)
HEAVY = ("torch", "ray", "ucxx", "nixl_cu12", "grpc", "triton")

# Third-party libraries a whole package keeps out of (the Ray actors are built in the pools' pool.py
# and deploy/; the YAML schema is deploy's; gRPC is the router's edge).
KEEPS_OUT: dict[str, frozenset[str]] = {
    "engine": frozenset({"ray", "grpc", "ucxx", "nixl_cu12", "yaml", "pydantic"}),
    "kv_transfer": frozenset({"ray", "grpc", "yaml", "pydantic"}),
    "memory_tiers": frozenset({"ray", "grpc", "yaml", "pydantic"}),
    "pool_runtime": frozenset({"grpc", "yaml", "pydantic"}),
    "router": frozenset({"ray", "yaml", "pydantic"}),
}

# Each wire library only at the edge that speaks it: the HTTP front door's libraries (pydantic as its
# request bodies' schema, as protobuf is gRPC's) only in router.http, and nowhere else.
HTTP_EDGE = "router.http"
HTTP_LIBRARIES = frozenset({"fastapi", "starlette", "uvicorn", "pydantic"})


def _at_http_edge(module: str) -> bool:
    return module == HTTP_EDGE or module.startswith(HTTP_EDGE + ".")


@dataclass(frozen=True, slots=True)
class Import:
    target: str  # a module of ours (the longest dotted prefix that is one)
    line: int
    type_only: bool  # under ``if TYPE_CHECKING:``


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in ALLOWED:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _ours(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                lines.update(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
    return lines


def _raw_imports(module: str) -> Iterator[tuple[str, int, bool]]:
    """(dotted name, line, type_only) of every import in ``module``'s source."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    type_only = _type_checking_lines(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, node.lineno in type_only
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            yield name, node.lineno, node.lineno in type_only
            for alias in node.names:  # ``from pkg import module``
                yield f"{name}.{alias.name}", node.lineno, node.lineno in type_only


def imports(module: str) -> list[Import]:
    """The modules of ours that ``module`` imports, with the packages above each of them."""
    out: dict[tuple[str, bool], Import] = {}
    for name, line, type_only in _raw_imports(module):
        target = _ours(name)
        while target:
            if target != module:
                out.setdefault((target, type_only), Import(target, line, type_only))
            target = target.rpartition(".")[0]
    return list(out.values())


def external(module: str) -> set[str]:
    """Top-level names of the third-party modules ``module`` imports at run time."""
    return {
        name.split(".")[0] for name, _, type_only in _raw_imports(module) if not type_only and not _ours(name)
    }


def _package(module: str) -> str:
    return module.split(".")[0]


def test_the_rules_cover_every_package_and_are_a_hierarchy() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    shipped = {p.split(".")[0] for p in pyproject["tool"]["setuptools"]["packages"]}
    assert shipped == set(ALLOWED)
    # the rules themselves have no circle: each package's allowed set is below it in dict order
    order = list(ALLOWED)
    for pkg, allowed in ALLOWED.items():
        assert all(order.index(a) < order.index(pkg) for a in allowed), pkg


def forbidden(edges: list[tuple[str, str, int]]) -> list[str]:
    """The (module, imported module, line) edges that break ALLOWED, as messages."""
    return [
        f"{module}:{line} imports {target} ({_package(module)} may import only "
        f"{sorted(ALLOWED[_package(module)]) or 'nothing of ours'})"
        for module, target, line in edges
        if _package(target) != _package(module) and _package(target) not in ALLOWED[_package(module)]
    ]


def test_no_package_imports_one_it_may_not() -> None:
    bad = forbidden([(m, i.target, i.line) for m in MODULES for i in imports(m)])
    assert not bad, "\n".join(bad)


def cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for m in graph:
        if m not in index:
            visit(m)
    return found


def test_no_import_circles() -> None:
    assert cycles({m: sorted({i.target for i in imports(m)}) for m in MODULES}) == []


def test_the_checks_find_what_they_look_for() -> None:
    """A circle, an upward or sideways arrow, and the imports of a real module are all seen."""
    assert cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert cycles({"a": ["b"], "b": []}) == []
    edges = [
        ("engine.llm_engine", "memory_tiers.tier_store", 1),  # upward: the engine built its tiers
        ("prefill_pool.worker", "decode_pool.handoff", 2),  # sideways: one pool inside another
        ("router.serve", "deploy.config", 3),  # upward: a command in the library
        ("decode_pool.worker", "pool_runtime.handoff", 4),  # allowed
        ("engine.model", "engine.attention", 5),  # within a package
    ]
    found = [m.split(":")[0] for m in forbidden(edges)]
    assert found == ["engine.llm_engine", "prefill_pool.worker", "router.serve"]
    assert (
        _ours("kv_transfer.transport.KVDestination") == "kv_transfer.transport" and _ours("torch.nn") is None
    )
    runner = {i.target for i in imports("engine.model_runner")}
    assert {"engine.model", "engine.attention", "engine.scheduler", "engine"} <= runner
    assert "torch" in external("engine.model_runner")


def test_seams_import_no_implementation() -> None:
    bad = [
        f"{seam} imports {imp.target}"
        for seam, forbidden in SEAMS.items()
        for imp in imports(seam)
        if imp.target != _package(seam) and imp.target.startswith(forbidden) and imp.target != seam
    ]
    assert not bad, "\n".join(bad)


def _closure(module: str) -> set[str]:
    seen, todo = {module}, [module]
    while todo:
        for imp in imports(todo.pop()):
            if not imp.type_only and imp.target not in seen:
                seen.add(imp.target)
                todo.append(imp.target)
    return seen


def test_the_control_plane_needs_no_torch_ray_ucx_or_grpc() -> None:
    bad = [
        f"{module} -> {dep} imports {sorted(external(dep) & set(HEAVY))}"
        for module in PURE
        for dep in sorted(_closure(module))
        if external(dep) & set(HEAVY)
    ]
    assert not bad, "\n".join(bad)


def _kept_out(module: str) -> frozenset[str]:
    out = KEEPS_OUT.get(_package(module), frozenset())
    if _at_http_edge(module):
        return out - HTTP_LIBRARIES
    if _package(module) == "deploy":  # deploy's YAML schema is pydantic
        return out | (HTTP_LIBRARIES - {"pydantic"})
    return out | HTTP_LIBRARIES


def test_packages_keep_out_of_what_is_not_theirs() -> None:
    bad = [
        f"{module} imports {sorted(external(module) & _kept_out(module))}"
        for module in MODULES
        if external(module) & _kept_out(module)
    ]
    assert not bad, "\n".join(bad)


def test_the_http_libraries_stay_at_the_http_edge() -> None:
    """The rule above, checked to bite: the HTTP app may import FastAPI, the servicer may not."""
    assert "fastapi" in external("router.http.app") and not external("router.http.app") & _kept_out(
        "router.http.app"
    )
    assert {"fastapi", "uvicorn", "pydantic"} <= _kept_out("router.servicer")
    assert {"fastapi", "starlette", "uvicorn", "pydantic"} <= _kept_out("engine.llm_engine")
    assert "fastapi" in _kept_out("deploy.serve") and "pydantic" not in _kept_out("deploy.config")


def test_no_module_over_500_lines() -> None:
    generated = ROOT / "proto" / "tandem"
    paths = [*MODULES.values(), *sorted((ROOT / "tests").rglob("*.py"))]
    long = {
        str(p.relative_to(ROOT)): n
        for p in paths
        if not p.is_relative_to(generated) and (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}
