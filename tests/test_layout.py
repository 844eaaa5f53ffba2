"""The shape of the code: no import cycles (lazy imports included), short files, a stable public API, shards
without Ray, and one gRPC status for every error code."""

import ast
import pickle
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "engram"
GENERATED = {"engram_pb2.py", "engram_pb2_grpc.py"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every engram module this file imports, at the top or inside functions (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("engram")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.startswith("engram"):
                for a in node.names:  # `from . import x` names a module when x is one
                    sub = f"{base}.{a.name}"
                    out.add(sub if (ROOT / (sub.replace(".", "/") + ".py")).exists() else base)
    return out


def graph() -> dict[str, set[str]]:
    files = [p for p in PACKAGE.rglob("*.py") if p.name not in GENERATED]
    known = {module_name(p) for p in files}
    return {module_name(p): {m for m in imports(p) if m in known and m != module_name(p)} for p in files}


def test_no_import_cycles():
    g = graph()
    # the root package's lazy re-exports are a facade over the modules, not a dependency of them
    g["engram"] = set()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(n) :], n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_layers_depend_downward():
    """workers know nothing of the coordinator, gRPC or Ray; the decoder nothing of workers; the CLI is a leaf."""
    g = graph()
    for m, deps in g.items():
        if m.startswith(("engram.workers", "engram.decoder")):
            assert not any(d.startswith(("engram.coordinator", "engram.evals", "engram.proto")) for d in deps), (
                m,
                deps,
            )
        if m.startswith("engram.decoder"):
            assert not any(d.startswith("engram.workers") for d in deps), (m, deps)
        assert "engram.coordinator.cli" not in deps, f"{m} imports the CLI"
    for path in [*(PACKAGE / "workers").glob("*.py"), *(PACKAGE / "decoder").glob("*.py")]:
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {"ray", "grpc"} & {x.split(".")[0] for x in names}, f"{path.name} imports Ray or gRPC"


def test_no_long_files():
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "bench").glob("*.py")]:
        if path.name not in GENERATED:
            assert len(path.read_text().splitlines()) <= 400, f"{path.relative_to(ROOT)} is over 400 lines: split it"


def test_public_api():
    import engram

    assert engram.EngramClient.__module__ == "engram.coordinator.client"
    assert engram.EngramConfig().ask.top_k >= 1
    with pytest.raises(AttributeError):
        _ = engram.NoSuchThing


def test_every_error_code_maps_to_a_grpc_and_an_http_status():
    from engram.coordinator.http_errors import HTTP_STATUS
    from engram.coordinator.server import STATUS
    from engram.errors import EngramError, ErrorCode

    assert set(STATUS) == set(ErrorCode)
    assert set(HTTP_STATUS) == set(ErrorCode) and all(400 <= s < 600 for s, _ in HTTP_STATUS.values())
    assert all(isinstance(s, grpc.StatusCode) and s != grpc.StatusCode.OK for s in STATUS.values())
    # errors cross Ray actor boundaries by pickling: the code and message survive
    e = pickle.loads(pickle.dumps(EngramError(ErrorCode.ALREADY_EXISTS, "document 'a' already exists")))
    assert (e.code, str(e)) == (ErrorCode.ALREADY_EXISTS, "document 'a' already exists")
    with pytest.raises(ValueError):
        EngramError("no-such-code", "x")


def test_shard_processes_do_not_load_torch():
    """A shard actor's process imports its class's module: that must not pull in torch or the model (RSS)."""
    import subprocess
    import sys

    heavy = "{'torch', 'transformers', 'grpc'}"
    code = f"import sys, engram.coordinator.shard_actor; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout
