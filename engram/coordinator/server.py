"""The async gRPC service (grpc.aio, route_guide style): validates requests and maps them onto the Engine."""

from __future__ import annotations

import asyncio
import codecs
import logging
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..errors import EngramError, ErrorCode
from ..proto import engram_pb2 as pb
from ..proto import engram_pb2_grpc as pb_grpc
from .auth import Auth, AuthError, check_exposure
from .config import EngramConfig
from .engine import ClusterStats, Engine
from .health import watch_health
from .metrics import Metrics
from .openai_api import start_http
from .validate import ask_options, check_mode, check_name, check_question

log = logging.getLogger("engram")

STATUS = {  # every ErrorCode (tests/test_errors.py checks none is missing)
    ErrorCode.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.BUSY: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.STALE: grpc.StatusCode.UNAVAILABLE,  # a shard restarted mid-write: retry with the same request_id
}
INVALID = ErrorCode.INVALID


def _chunks(hits, texts) -> list[pb.Chunk]:
    return [
        pb.Chunk(
            chunk_id=f"{h.document_id}#{h.seq}",
            document_id=h.document_id,
            seq=h.seq,
            offset=h.offset,
            score=h.score,
            shard=h.shard,
            text=t,
        )
        for h, t in zip(hits, texts)
    ]


def to_message(cls, result, **fields):
    """A protobuf message from a typed result: the message's own scalar fields, copied by name (so what a result
    carries beyond them, like a shard's pid, never reaches a client), plus `fields` for the nested ones."""
    names = [f.name for f in cls.DESCRIPTOR.fields if f.name not in fields]
    return cls(**{n: getattr(result, n) for n in names}, **fields)


def stats_reply(s: ClusterStats) -> pb.StatsReply:
    return to_message(
        pb.StatsReply,
        s,
        shards=[to_message(pb.ShardStats, sh) for sh in s.shards],
        rebalance=to_message(pb.Rebalance, s.rebalance),
    )


class EngramService(pb_grpc.EngramServicer):
    def __init__(self, engine: Engine, cfg: EngramConfig, metrics: Metrics | None = None):
        self.engine, self.cfg = engine, cfg
        self.auth = Auth(cfg.auth.tokens_file)
        self.metrics = metrics or Metrics()

    async def _run(self, context, coro, method: str = ""):
        t0, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            return await coro
        except EngramError as e:
            code = STATUS[e.code]
            await context.abort(code, str(e))
        except AuthError as e:
            code = e.code
            await context.abort(code, str(e))
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            # A bug or an unexpected failure: the client gets an id to quote, never a traceback, path or address.
            code = grpc.StatusCode.INTERNAL
            incident = uuid.uuid4().hex[:12]
            log.exception("internal error %s in %s", incident, method or "?")
            await context.abort(code, f"internal error (incident {incident}); the server log has the details")
        finally:
            method = method or getattr(coro, "__qualname__", "?").split(".")[-2]
            self.metrics.requests.labels(method=method, code=code.name).inc()
            self.metrics.latency.labels(method=method).observe(time.perf_counter() - t0)

    async def Write(self, request_iterator, context):
        t0 = time.perf_counter()
        totals = {"documents": 0, "chunks": 0, "tokens": 0, "new_blocks": 0}
        limit = self.cfg.server.max_document_bytes

        def decode(key, decoder, data: bytes, size: int, final: bool = False) -> str:
            """Each part is decoded as it arrives (a character split across parts is carried over): the document is
            held once, as text, instead of as its parts, their concatenation and its text at once."""
            try:
                return decoder.decode(data, final)
            except UnicodeDecodeError as e:
                raise EngramError(
                    INVALID, f"document {key[1]!r} is not valid UTF-8 (byte {size + e.start}); send UTF-8 text"
                ) from None

        async def flush(key, parts, decoder, size, request_id):
            """Validate one whole document, then write it (durable when this returns)."""
            parts.append(decode(key, decoder, b"", size, final=True))
            text = "".join(parts)
            parts.clear()
            if not text.strip():
                raise EngramError(INVALID, f"document {key[1]!r} is empty")
            try:
                out = await self.engine.write_document(key[0], key[1], text, request_id)
            except EngramError as e:
                raise EngramError(e.code, f"{e}{stored_note()}") from e
            totals["documents"] += 1
            for k in ("chunks", "tokens", "new_blocks"):
                totals[k] += getattr(out, k)

        def stored_note() -> str:
            n = totals["documents"]
            return f" ({n} earlier documents of this stream are stored)" if n else ""

        async def consume():
            key, parts, size, request_id, decoder = None, [], 0, "", None
            seen: set[tuple[str, str]] = set()
            async for req in request_iterator:
                check_name("namespace", req.namespace)
                check_name("document_id", req.document_id)
                self.auth.check(context, req.namespace)
                if len(req.request_id) > 128:
                    raise EngramError(INVALID, "request_id must be at most 128 characters")
                if (req.namespace, req.document_id) != key:
                    if (req.namespace, req.document_id) in seen:  # its parts would be two documents' text mixed
                        raise EngramError(
                            INVALID,
                            f"document {req.document_id!r} appears twice in this write stream; send each "
                            f"document's parts together, once{stored_note()}",
                        )
                    seen.add((req.namespace, req.document_id))
                    if key is not None:  # backpressure: the next part is read after this commit
                        await flush(key, parts, decoder, size, request_id)
                    key, parts, size, request_id = (req.namespace, req.document_id), [], 0, req.request_id
                    decoder = codecs.getincrementaldecoder("utf-8")()
                if size + len(req.text) > limit:
                    raise EngramError(
                        INVALID,
                        f"document {req.document_id!r} exceeds the {limit}-byte limit "
                        "(server.max_document_bytes); split it into several documents",
                    )
                parts.append(decode(key, decoder, req.text, size))
                size += len(req.text)
            if key is None:
                raise EngramError(INVALID, "the write stream carried no documents")
            await flush(key, parts, decoder, size, request_id)

        try:
            await self._run(context, consume(), "Write")
        finally:
            for k, v in totals.items():
                self.metrics.written.labels(kind=k).inc(v)
        return pb.WriteReply(seconds=time.perf_counter() - t0, **totals)

    def _ask_request(self, request, context) -> tuple:
        check_name("namespace", request.namespace)
        self.auth.check(context, request.namespace)
        check_question(self.cfg, request.question)
        top_k, max_new = ask_options(self.cfg, request.top_k, request.max_new_tokens)
        return request.namespace, request.question, top_k, max_new, check_mode(request.mode)

    def _ask_reply(self, out) -> pb.AskReply:
        for stage, seconds in out.timings.items():
            self.metrics.ask_stage.labels(stage=stage.removesuffix("_s")).observe(seconds)
        return pb.AskReply(
            answer=out.answer,
            chunks=_chunks(out.hits, out.texts),
            timings=pb.Timings(**out.timings),
            context_tokens=out.context_tokens,
            new_tokens=out.new_tokens,
            prompt_tokens=out.prompt_tokens,
        )

    async def Ask(self, request, context):
        async def go():
            return self._ask_reply(await self.engine.ask(*self._ask_request(request, context)))

        return await self._run(context, go(), "Ask")

    async def AskStream(self, request, context):
        """Events are written from here (context.write): _run maps every failure, also mid-stream, to a status."""

        async def go():
            stream = self.engine.ask_stream(*self._ask_request(request, context))
            try:
                async for part in stream:
                    if isinstance(part, str):
                        await context.write(pb.AskEvent(text=part))
                    elif isinstance(part, list):  # the hits, in reading order (texts come with the reply)
                        await context.write(pb.AskEvent(retrieval=pb.Retrieval(chunks=_chunks(part, [""] * len(part)))))
                    else:
                        await context.write(pb.AskEvent(reply=self._ask_reply(part)))
            finally:
                await stream.aclose()  # a client gone mid-answer: the decoder stops

        await self._run(context, go(), "AskStream")

    async def Read(self, request, context):
        async def go():
            check_name("namespace", request.namespace)
            self.auth.check(context, request.namespace)
            check_question(self.cfg, request.query)
            top_k, _ = ask_options(self.cfg, request.top_k)
            out = await self.engine.read(request.namespace, request.query, top_k)
            return pb.ReadReply(
                chunks=_chunks(out.hits, out.texts), readout=out.readout.tolist(), timings=pb.Timings(**out.timings)
            )

        return await self._run(context, go(), "Read")

    async def Delete(self, request, context):
        async def go():
            check_name("namespace", request.namespace)
            check_name("document_id", request.document_id)
            self.auth.check(context, request.namespace)
            return pb.DeleteReply(chunks=await self.engine.delete(request.namespace, request.document_id))

        return await self._run(context, go(), "Delete")

    async def ListNamespaces(self, request, context):
        async def go():
            sizes = await self.engine.namespace_sizes()
            names = self.auth.readable(self.auth.namespaces(self.auth.header_of(context)), sizes)
            return pb.ListNamespacesReply(namespaces=[pb.NamespaceInfo(name=n, **asdict(sizes[n])) for n in names])

        return await self._run(context, go(), "ListNamespaces")

    async def ListDocuments(self, request, context):
        async def go():
            check_name("namespace", request.namespace)
            self.auth.check(context, request.namespace)
            docs = await self.engine.documents(request.namespace)
            return pb.ListDocumentsReply(
                documents=[
                    pb.DocumentInfo(
                        document_id=d.name, chunks=d.chunks, tokens=d.tokens, sha256=d.digest, written_at=d.written
                    )
                    for d in docs
                ]
            )

        return await self._run(context, go(), "ListDocuments")

    async def GetDocument(self, request, context):
        async def go():
            check_name("namespace", request.namespace)
            check_name("document_id", request.document_id)
            self.auth.check(context, request.namespace)
            data = (await self.engine.document_text(request.namespace, request.document_id)).encode()
            for i in range(0, max(len(data), 1), 1 << 20):
                await context.write(pb.DocumentPart(text=data[i : i + (1 << 20)]))

        await self._run(context, go(), "GetDocument")

    async def DeleteNamespace(self, request, context):
        async def go():
            check_name("namespace", request.namespace)
            self.auth.check(context, request.namespace)
            documents, chunks = await self.engine.delete_namespace(request.namespace)
            return pb.DeleteNamespaceReply(documents=documents, chunks=chunks)

        return await self._run(context, go(), "DeleteNamespace")

    async def Stats(self, request, context):
        async def go():
            self.auth.check(context, None)
            s = await self.engine.stats()
            self.metrics.observe_stats(s)
            return stats_reply(s)

        return await self._run(context, go(), "Stats")

    async def AddShards(self, request, context):
        async def go():
            self.auth.check(context, None)
            shards, added = await self.engine.add_shards(request.count)
            return pb.AddShardsReply(shards=shards, added=added)

        return await self._run(context, go(), "AddShards")

    async def Compact(self, request, context):
        async def go():
            self.auth.check(context, None)
            done = await self.engine.compact()
            return pb.CompactReply(shards=[to_message(pb.ShardCompaction, c) for c in done])

        return await self._run(context, go(), "Compact")


async def start_server(
    engine: Engine, cfg: EngramConfig, port: int | None = None, http_port: int | None = None
) -> tuple[grpc.aio.Server, int]:
    """Start serving on cfg.server.host; port 0 picks a free one. Returns (server, bound port). Also starts the
    OpenAI-compatible HTTP API (http_port, default server.http_port; -1 = off; its server and port are
    `server.http` and `server.http_port`), the Prometheus endpoint (server.metrics_port) and resumes an unfinished
    rebalance."""
    tls = bool(cfg.server.tls_cert_file and cfg.server.tls_key_file)
    check_exposure(cfg.server.host, cfg.auth.tokens_file, tls, cfg.server.allow_unauthenticated)
    limit = cfg.server.max_message_bytes
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
        # admission control: past this many RPCs in progress, new ones get RESOURCE_EXHAUSTED at once instead of
        # queueing without bound (clients back off and retry)
        maximum_concurrent_rpcs=cfg.server.max_concurrent_rpcs or None,
    )
    metrics = Metrics()
    service = EngramService(engine, cfg, metrics)
    pb_grpc.add_EngramServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (pb.DESCRIPTOR.services_by_name["Engram"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{cfg.server.host}:{cfg.server.port if port is None else port}"
    if cfg.server.tls_cert_file and cfg.server.tls_key_file:
        creds = grpc.ssl_server_credentials(
            [(Path(cfg.server.tls_key_file).read_bytes(), Path(cfg.server.tls_cert_file).read_bytes())]
        )
        bound = server.add_secure_port(address, creds)
    elif cfg.server.tls_cert_file or cfg.server.tls_key_file:
        raise ValueError("server.tls_cert_file and server.tls_key_file go together")
    else:
        bound = server.add_insecure_port(address)
    await server.start()
    http_port = cfg.server.http_port if http_port is None else http_port
    server.http, server.http_port = None, None
    if http_port >= 0:
        try:
            server.http, server.http_port = await start_http(engine, cfg, service.auth, metrics, http_port)
        except BaseException:
            await server.stop(None)
            raise
    await health_servicer.set("engram.v1.Engram", health_pb2.HealthCheckResponse.SERVING)
    if cfg.server.metrics_port is not None and cfg.server.metrics_port >= 0:  # TOML has no null: -1 = off
        server.metrics_port = metrics.serve(cfg.server.metrics_host, cfg.server.metrics_port)
        server.metrics_task = asyncio.ensure_future(metrics.refresh_forever(engine, cfg.server.metrics_refresh_s))
    server.engram_metrics = metrics
    server.health_task = asyncio.ensure_future(watch_health(engine, health_servicer, cfg.server.health_interval_s))
    engine.start_background()
    log.info("engram serving on %s:%d (HTTP: %s)", cfg.server.host, bound, server.http_port or "off")
    return server, bound


async def serve_forever(cfg: EngramConfig) -> None:
    engine = await asyncio.to_thread(Engine, cfg)
    server, port = await start_server(engine, cfg)
    http = f", OpenAI-compatible HTTP on port {server.http_port}" if server.http else ""
    print(f"engram: serving gRPC on {cfg.server.host}:{port}{http} with {len(engine.shards)} shards", flush=True)
    try:
        await server.wait_for_termination()
    finally:
        await stop_server(server)


async def stop_server(server: grpc.aio.Server, grace: float = 1.0) -> None:
    """Stop the HTTP API, then gRPC."""
    if getattr(server, "http", None) is not None:
        await server.http.stop()
    await server.stop(grace=grace)
