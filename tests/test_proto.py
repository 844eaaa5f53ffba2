"""The committed gRPC stubs are what engram/proto/generate.py makes from engram/proto/engram.proto."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_stubs_are_fresh(tmp_path):
    spec = importlib.util.spec_from_file_location("generate", ROOT / "engram" / "proto" / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.generate(tmp_path)
    for name in ("engram_pb2.py", "engram_pb2.pyi", "engram_pb2_grpc.py"):
        assert (tmp_path / name).read_text() == (ROOT / "engram" / "proto" / name).read_text(), (
            f"engram/proto/{name} is stale: run `python engram/proto/generate.py`"
        )
