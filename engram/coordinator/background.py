"""The engine and its servers on an event loop in a daemon thread: for the demo, benchmarks and tests."""

from __future__ import annotations

import asyncio
import threading

import grpc

from .config import EngramConfig
from .engine import Engine
from .server import start_server, stop_server


class BackgroundServer:
    """Engine + gRPC server on an event loop in a daemon thread (for the demo and tests).

    with BackgroundServer(cfg) as srv: EngramClient(srv.address)..."""

    def __init__(self, cfg: EngramConfig, port: int = 0, http_port: int | None = 0):
        """port, http_port: 0 = any free port (the default here: a demo or a test never collides); http_port None
        = as configured (server.http_port), -1 = no HTTP API."""
        self.cfg, self.port = cfg, port
        self.http_port = cfg.server.http_port if http_port is None or cfg.server.http_port < 0 else http_port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="engram-server")
        self.engine: Engine | None = None
        self.server: grpc.aio.Server | None = None

    def start(self) -> BackgroundServer:
        self.engine = Engine(self.cfg)
        self.thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            start_server(self.engine, self.cfg, self.port, self.http_port), self.loop
        )
        self.server, self.port = fut.result(timeout=60)
        self.http_port = self.server.http_port
        return self

    @property
    def address(self) -> str:
        return f"{self.cfg.server.host}:{self.port}"

    @property
    def http_url(self) -> str | None:
        """The OpenAI-compatible API's base URL (".../v1"), None when off."""
        scheme = "https" if self.cfg.server.tls_cert_file else "http"
        return f"{scheme}://{self.cfg.server.host}:{self.http_port}/v1" if self.http_port else None

    def stop(self) -> None:
        if self.server is not None:
            self.loop.call_soon_threadsafe(self.server.health_task.cancel)
            asyncio.run_coroutine_threadsafe(stop_server(self.server), self.loop).result(timeout=60)
            self.server.engram_metrics.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
