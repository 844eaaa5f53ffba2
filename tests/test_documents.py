"""The documents API (gRPC, client, CLI, HTTP) and folder ingest (`engram write DIR`) on the session's service."""

import hashlib
import subprocess
import sys
import time

import grpc
import httpx2 as httpx  # what the openai client ships with
import pytest

from engram.coordinator.client import EngramClient
from engram.coordinator.ingest import sync_folder
from tests.test_pdf import MANUAL, tiny_pdf

pytestmark = pytest.mark.integration

# several chunks (seqs across both shards), non-ASCII, runs of spaces and blank lines: the text must come back exact
LONG = "\n\n".join(
    f"## Section {i}\n\nThe façade of building {i} faces the river — naïve  double  spaces, 東京 {i * 7}.\n"
    for i in range(40)
)


def make_folder(root):
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a.md").write_text("# Alpha\n\nThe alpha gate opens at dawn.\n")
    (root / "sub" / "b.txt").write_text(LONG)
    (root / ".hidden" / "x.md").write_text("never read")
    (root / "image.bin").write_bytes(b"\x00\x01")
    (root / "bad.md").write_bytes(b"caf\xe9 latin-1")
    (root / "empty.txt").write_text("  \n")
    (root / "sub" / "manual.pdf").write_bytes(tiny_pdf(MANUAL))  # stored as its text layer
    (root / "scan.pdf").write_bytes(tiny_pdf(["", ""]))  # no text layer: skipped, with the reason


def engram_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engram.coordinator.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_folder_sync_and_documents(service, tmp_path):
    root = tmp_path / "notes"
    make_folder(root)
    ns = "docs-sync"
    c = EngramClient(service.address, timeout=300)
    t0 = time.time()
    first = sync_folder(c, root, ns)
    assert sorted(first.written) == ["a.md", "sub/b.txt", "sub/manual.pdf"] and not first.replaced
    assert sorted(f for f, _ in first.skipped) == ["bad.md", "empty.txt", "scan.pdf"]
    assert "without a text layer" in dict(first.skipped)["scan.pdf"]

    docs = {d.document_id: d for d in c.documents(ns)}
    assert set(docs) == {"a.md", "sub/b.txt", "sub/manual.pdf"}
    assert c.get_document("sub/manual.pdf", namespace=ns) == "\n\n".join(MANUAL)
    assert docs["sub/manual.pdf"].sha256 == hashlib.sha256("\n\n".join(MANUAL).encode()).hexdigest()
    b = docs["sub/b.txt"]
    assert b.sha256 == hashlib.sha256(LONG.encode()).hexdigest() and b.chunks > 4 and b.tokens > 4 * 128
    assert t0 - 1 <= b.written_at <= time.time() + 1
    assert c.get_document("sub/b.txt", namespace=ns) == LONG  # decoded from the stored tokens, exactly
    info = {n.name: n for n in c.namespaces()}[ns]  # per namespace: the listing's sums over documents
    assert (info.documents, info.chunks, info.tokens) == (
        3,
        sum(d.chunks for d in docs.values()),
        sum(d.tokens for d in docs.values()),
    )

    again = sync_folder(c, root, ns)
    assert sorted(again.unchanged) == ["a.md", "sub/b.txt", "sub/manual.pdf"] and not again.written
    assert again.tokens == 0
    (root / "a.md").write_text("# Alpha\n\nThe alpha gate now opens at noon.\n")
    (root / "sub" / "b.txt").unlink()
    (root / "sub" / "manual.pdf").unlink()
    third = sync_folder(c, root, ns, prune=True)
    assert third.replaced == ["a.md"] and third.pruned == ["sub/b.txt", "sub/manual.pdf"]
    assert [d.document_id for d in c.documents(ns)] == ["a.md"]
    assert "noon" in c.get_document("a.md", namespace=ns)

    # the CLI as a user runs it (a process of its own: in-process, its imports disturbed later tests' log capture)
    cat = engram_cli("cat", "a.md", "-n", ns, "--server", service.address)
    assert cat.returncode == 0 and cat.stdout == (root / "a.md").read_text()
    assert engram_cli("delete-namespace", ns, "--server", service.address).returncode == 2  # no --yes: nothing
    scan = engram_cli("write", str(root / "scan.pdf"), "-n", ns, "--server", service.address)
    assert scan.returncode == 2 and "scan.pdf was not written: a PDF without a text layer" in scan.stderr
    assert [d.document_id for d in c.documents(ns)] == ["a.md"]


def test_documents_over_http(service):
    c = EngramClient(service.address, timeout=300)
    ns = "docs-http"
    c.write([("guide/intro.md", "Engram keeps the decoder's own memory of your text."), ("z", "zeta")], namespace=ns)
    with httpx.Client(base_url=service.http_url, timeout=120, trust_env=False) as http:
        listed = http.get(f"/namespaces/{ns}/documents").json()["data"]
        assert [d["id"] for d in listed] == ["guide/intro.md", "z"] and all(d["sha256"] for d in listed)
        listed = {n["id"]: n for n in http.get("/namespaces").json()["data"]}
        assert listed[ns]["tokens"] > 0 and listed[ns]["chunks"] > 0 and listed[ns]["documents"] >= 1
        doc = http.get(f"/namespaces/{ns}/documents/guide/intro.md").json()
        assert doc["text"] == "Engram keeps the decoder's own memory of your text."
        missing = http.get(f"/namespaces/{ns}/documents/nope")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
        gone = http.delete(f"/namespaces/{ns}/documents/z").json()
        assert gone["deleted"] and gone["chunks"] == 1
        dropped = http.delete(f"/namespaces/{ns}").json()
        assert dropped["documents"] == 1
        assert http.delete(f"/namespaces/{ns}").status_code == 404  # nothing left to delete
    assert c.documents(ns) == []
    with pytest.raises(grpc.RpcError) as e:
        c.ask("what does Engram keep?", namespace=ns)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        c.get_document("guide/intro.md", namespace=ns)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
