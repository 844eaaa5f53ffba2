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


def test_stats_table_lists_each_namespace():
    """`engram stats` prints the shards, the totals and one line per namespace with its documents, chunks, tokens."""
    from engram.coordinator.client import format_stats
    from engram.proto import engram_pb2 as pb

    reply = pb.StatsReply(shards=[pb.ShardStats(shard=0, node="n", documents=2, chunks=5, tokens=600)], tokens=600)
    text = format_stats(reply, [pb.NamespaceInfo(name="alpha", documents=2, chunks=5, tokens=600)])
    assert text.splitlines()[-1].split() == ["alpha", "2", "5", "600"]
    assert "namespace" not in format_stats(reply)
