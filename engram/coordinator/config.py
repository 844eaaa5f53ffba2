"""The one configuration tree. Every section is a dataclass owned by the package that uses it; a TOML file
(`engram serve --config engram.toml`) overrides any field: [cluster] shards = 4, [shard] data_dir = "/data", ...
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..decoder.codec import load_codec
from ..decoder.layout import BlockLayout, check_position_scheme
from ..decoder.model import DecoderConfig, model_config
from ..decoder.rope import check_supported
from ..workers.encoder import EncoderConfig
from ..workers.shard import ShardConfig
from . import routing


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50551
    # OpenAI-compatible HTTP API (/v1/models, /v1/chat/completions, /v1/completions) on the same host, with the
    # same tokens, TLS and limits; -1 = off, 0 = any free port
    http_port: int = 8000
    max_message_bytes: int = 16 * 1024 * 1024  # per gRPC message, both directions; clients send 1 MiB parts
    max_document_bytes: int = 256 * 1024 * 1024  # one document, all its parts together
    max_question_chars: int = 4096
    tls_cert_file: str | None = None  # PEM; with tls_key_file, the server speaks TLS only
    tls_key_file: str | None = None
    metrics_port: int | None = 9464  # Prometheus /metrics over HTTP; -1 (or None) = off, 0 = any free port
    # /metrics is plain HTTP without tokens (it carries per-shard sizes): loopback unless the operator opens it,
    # e.g. "0.0.0.0" in a pod whose NetworkPolicy admits only the scraper (deploy/kuberay)
    metrics_host: str = "127.0.0.1"
    metrics_refresh_s: float = 15.0  # how often per-shard gauges are refreshed from the shards
    max_concurrent_rpcs: int = 256  # RPCs in progress at once; more are refused with RESOURCE_EXHAUSTED (0 = no limit)
    health_interval_s: float = 5.0  # how often the gRPC health status is checked against the shards
    log_format: str = "text"  # "json": one JSON object per log line (for log shippers)
    # A host beyond loopback needs auth.tokens_file; true serves it without (a network only trusted clients reach)
    allow_unauthenticated: bool = False


@dataclass
class AuthConfig:
    """Per-namespace bearer tokens. tokens_file is TOML:  [tokens]  "<token>" = ["namespace", ...]
    ("*" = every namespace, and Stats). No file: no authentication (bind to loopback)."""

    tokens_file: str | None = None


@dataclass
class ClusterConfig:
    address: str | None = None  # Ray address to join; None starts a local Ray
    num_cpus: int | None = None  # for a local Ray; None = all cores
    shards: int = 2
    encoders: int = 0  # encoder actors; 0 = one per CPU of the cluster (at least 1)
    encoder_cpus: float = 1.0  # each encoder uses this many cores (torch threads)
    encoder_gpus: float = 0.0  # > 0: each encoder asks Ray for this share of a GPU and encodes with CUDA
    # Custom Ray resource shard actors require (e.g. "engram_shard": give CPU nodes `--resources
    # '{"engram_shard": 4}'`); None places shards anywhere.
    shard_resource: str | None = None
    decoder_gpus: float | None = None  # None = 1 if the cluster has a GPU, else run on CPU
    max_in_flight: int = 0  # encode batches in flight per write; 0 = 2 per encoder
    write_attempts: int = 4  # a document write rides out this many shard failures before giving up
    namespace: str = "engram"  # Ray namespace the actors are registered under
    # Identical chunks share one stored block within a namespace ("namespace", the default) or across the whole
    # cluster ("cluster"). Cluster-wide sharing saves encoding and disk when namespaces share text, but then a
    # writer can tell from `new_blocks` or write latency whether another namespace holds a chunk: single tenant only.
    dedup_scope: str = "namespace"
    # Tokens a namespace may hold (its documents' tokens, summed over shards); a write that would pass it is refused
    # with RESOURCE_EXHAUSTED and stores nothing. 0 = no limit.
    namespace_max_tokens: int = 0

    def __post_init__(self):
        if self.dedup_scope not in ("namespace", "cluster"):
            raise ValueError(f"cluster.dedup_scope must be 'namespace' or 'cluster', not {self.dedup_scope!r}")
        if self.namespace_max_tokens < 0:
            raise ValueError(
                f"cluster.namespace_max_tokens must be 0 (no limit) or more, not {self.namespace_max_tokens}"
            )


@dataclass
class AskConfig:
    top_k: int = 4  # NIAH at 133k tokens: the needle chunk ranked 1st-3rd (BENCHMARKS.md)
    # Following chunks added per hit. 0 by default: with the default template they cost accuracy
    # (passkey 32k: 18/20 with 1 vs 20/20 without; BENCHMARKS.md).
    neighbors: int = 0
    # A chunk beside a hit (the one before or after it in its document), among the shards' candidates, is read too,
    # beside its hit, when its own BM25 is at least this fraction of the query's best: a fact a chunk boundary cuts
    # is read whole (its answer in the chunk next to the one the question resembles). 0 = off. Distinct text
    # (retrieval only): the answer read 16/16 at 128k and 1M (top 4 alone: 15/16, 14/16), 4.6 blocks a question;
    # through the service at 128k Engram 11/16 (9 before it and the bias per run); BENCHMARKS.md "A fact cut by a
    # chunk boundary".
    adjacent_lexical: float = 0.4
    # Drop hits scoring below this fraction of the best hit's score: a chunk far less like the question than the
    # best one only distracts the decoder (passkey 1M, top-4: 10/10 with 0.3 vs 9/10 with 0, which fills three
    # slots with filler chunks scoring 0.10 beside the needle's 0.59; NIAH unchanged; BENCHMARKS.md). 0 keeps all.
    min_score_ratio: float = 0.3
    # Order of the retrieved blocks before the question: "score" puts runs of consecutive chunks in order of
    # their best score, best last (nearest the question; k=4: 3/3 vs 2/3 for "document"); "document" keeps
    # reading order.
    block_order: str = "score"
    # Hybrid retrieval: a chunk scores dense + lexical_weight x share ** lexical_power, its share of the lexical
    # match put on lexical_scale: "coverage" = min(1, its BM25 / the query terms' summed idf), the share of the
    # question's information it holds (BM25 with the namespace's term statistics summed over shards); "max" = its
    # BM25 / the best BM25 of the query (the fusion before, at weight 0.25, power 1). The default, coverage cubed
    # at weight 3, was chosen on the distinct-text haystacks' saved candidates (bench/fusion_offline.py: recall@4
    # 80/80 over five 128k haystacks and 32/32 over two at 1M, where max at 0.25 found 72 and 30; weights 1-3 at
    # power 3 within one fact of 208; BENCHMARKS.md "Fusion by the share of the question"): a chunk holding nearly
    # all of the question's rare words (a UUID key and the chunk its value opens) outranks look-alikes that are
    # closer in sense, and a match of a few common words counts next to nothing. lexical_weight 0 = dense only
    # (and no lexical query).
    lexical_weight: float = 3.0
    lexical_scale: str = "coverage"
    lexical_power: float = 3.0
    max_top_k: int = 64
    max_new_tokens: int = 32
    max_max_new_tokens: int = 512
    position_scheme: str = "consecutive"  # "consecutive" (keys re-rotated) or "parallel" (Memory^3)
    # The retrieved blocks' keys times this: the question's attention logits to memory tokens (not to the sink,
    # not to itself) scaled, an inverse attention temperature over memory (APE-style composition). > 1 sharpens
    # the attention when many independently encoded blocks sit side by side (bench/composition.py; BENCHMARKS.md
    # "Reading many blocks"). 1 = the blocks as encoded.
    block_key_scale: float = 1.0
    # Retrieval's ranking carried into attention: the question's attention logits to a block's tokens get
    # λ x (its hit's score - the best hit's score) added, so blocks retrieval ranks far below the best are read
    # faintly instead of competing on equal terms (bench/relevance_bias.py; BENCHMARKS.md "Reading many blocks").
    # 10: NIAH 1M 9/10 vs 7/10 with 0, distinct text 128k 9/16 vs 7/16, every other grid within one case.
    # 0 = off (every block as encoded).
    retrieval_bias: float = 10.0
    # Asks waiting for or in the decoder at once; past it an Ask is refused with RESOURCE_EXHAUSTED at once
    # instead of queueing without bound. 0 = no limit.
    max_queued_asks: int = 64
    # Asks the decoder worker decodes together: every ask waiting when it is free, and asks arriving meanwhile
    # joining between decode steps, up to this many at once (their blocks side by side, padding masked; each
    # answers as it would alone). 1 = one at a time.
    max_batch: int = 16
    # Batched asks (max_batch > 1) draft up to this many tokens of each answer from the retrieved chunks' own tokens
    # (what follows the question's last words where they occur there: answers over memory mostly quote it) and check
    # the draft in the question's pass: the answer decoding token by token gives, in fewer passes
    # (engram/decoder/draft.py; BENCHMARKS.md "Drafts from memory"). 0 = off.
    draft_tokens: int = 8

    def __post_init__(self):
        if not 1 <= self.top_k <= self.max_top_k:
            raise ValueError(f"ask.top_k must be between 1 and ask.max_top_k ({self.max_top_k}), not {self.top_k}")
        if not 0.0 <= self.adjacent_lexical <= 1.0:
            raise ValueError(f"ask.adjacent_lexical must be between 0 and 1, not {self.adjacent_lexical}")
        if self.neighbors < 0:
            raise ValueError(f"ask.neighbors must be 0 or more, not {self.neighbors}")
        if not 0.0 <= self.min_score_ratio <= 1.0:
            raise ValueError(f"ask.min_score_ratio must be between 0 and 1, not {self.min_score_ratio}")
        if self.lexical_weight < 0:
            raise ValueError(f"ask.lexical_weight must be 0 or more, not {self.lexical_weight}")
        if not 0.5 <= self.lexical_power <= 8:
            raise ValueError(f"ask.lexical_power must be between 0.5 and 8, not {self.lexical_power}")
        if self.lexical_scale not in ("max", "coverage"):
            raise ValueError(f"ask.lexical_scale must be 'max' or 'coverage', not {self.lexical_scale!r}")
        if self.block_order not in ("score", "document"):
            raise ValueError(f"ask.block_order must be 'score' or 'document', not {self.block_order!r}")
        if not 1 <= self.max_new_tokens <= self.max_max_new_tokens:
            raise ValueError(
                f"ask.max_new_tokens must be between 1 and ask.max_max_new_tokens "
                f"({self.max_max_new_tokens}), not {self.max_new_tokens}"
            )
        check_position_scheme(self.position_scheme)
        if not 0.0 <= self.retrieval_bias <= 1000.0:
            raise ValueError(f"ask.retrieval_bias must be between 0 and 1000, not {self.retrieval_bias}")
        if not 0.5 <= self.block_key_scale <= 4.0:
            raise ValueError(f"ask.block_key_scale must be between 0.5 and 4, not {self.block_key_scale}")
        if not 1 <= self.max_batch <= 256:
            raise ValueError(f"ask.max_batch must be between 1 and 256, not {self.max_batch}")
        if not 0 <= self.draft_tokens <= 64:
            raise ValueError(f"ask.draft_tokens must be between 0 and 64, not {self.draft_tokens}")


@dataclass
class EngramConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    ask: AskConfig = field(default_factory=AskConfig)

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: dict) -> EngramConfig:
        data = tomllib.loads(Path(path).read_text()) if path else {}
        for section, values in overrides.items():
            data.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
        return _build(cls, data, "")


def content_fingerprint(cfg: EngramConfig, layout: BlockLayout) -> str:
    """The settings that shape a stored block, as its content address covers them (routing.fingerprint)."""
    e = cfg.encoder
    return routing.fingerprint(
        cfg.decoder.model,
        layout,
        e.span,
        e.scorer,
        e.embedder,
        e.window_tokens,
        e.window_stride,
        e.key_context_tokens,
        e.key_after_tokens,
        e.lexical_context_tokens,
    )


def block_layout(cfg: EngramConfig) -> BlockLayout:
    """The block layout every part uses, derived once from the decoder's own config (reads no weights; converts
    the embedded GGUF on first use). Checks what needs the model: the context fits its window."""
    e = cfg.encoder
    model = model_config(cfg.decoder)
    check_supported(model)  # an architecture whose keys cannot be moved exactly is refused at start
    codec = None
    if e.kv_dtype == "codec":
        codec = load_codec(e.kv_codec, cfg.decoder.model)
        head_dim = getattr(model, "head_dim", None) or model.hidden_size // model.num_attention_heads
        codec.check_fits(model.num_hidden_layers, model.num_key_value_heads, head_dim)
    return BlockLayout.of(
        model,
        e.chunk_tokens,
        e.keep_tokens,
        e.kv_dtype,
        cfg.shard.episodic.dim,
        e.windows,
        e.context_tokens,
        codec,
    )


def from_args(args) -> EngramConfig:
    """The configuration a command asks for: its --config file, then the flags it was given (serve, bench,
    demo, load: --host, --port, --http-port, --shards, --ray-address, --data-dir, --model)."""
    return EngramConfig.load(
        getattr(args, "config", None),
        server={
            "host": getattr(args, "host", None),
            "port": getattr(args, "port", None),
            "http_port": getattr(args, "http_port", None),
        },
        cluster={"shards": getattr(args, "shards", None), "address": getattr(args, "ray_address", None)},
        shard={"data_dir": getattr(args, "data_dir", None)},
        decoder={"model": getattr(args, "model", None)},
    )


def _build(cls, data: dict, where: str):
    kwargs = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in fields:
            raise ValueError(f"unknown configuration key {where}{key!r}; known: {', '.join(fields)}")
        default = fields[key].default_factory() if fields[key].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            kwargs[key] = _build(type(default), value, f"{where}{key}.")
        else:
            kwargs[key] = value
    return cls(**kwargs)
