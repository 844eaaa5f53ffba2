"""Short passkey documents through a real local service, each in its own namespace: which chunks are read and
whether the pass key comes back (the case that found ask.retrieval_bias cutting a passage: BENCHMARKS.md "A run of
consecutive chunks is biased as one passage").

    .venv/bin/python bench/short_passkeys.py                       # the defaults
    .venv/bin/python bench/short_passkeys.py ask.retrieval_bias=0  # any config field as section.name=value
"""

from __future__ import annotations

import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "token")

CASES = [(3000, 0.5, 11111), (3000, 0.2, 22222), (3000, 0.8, 33333), (8000, 0.6, 48213), (2000, 0.5, 11111)]
CASES += [(4000, 0.5, 11111)]


def main() -> None:
    from engram.coordinator.background import BackgroundServer
    from engram.coordinator.client import EngramClient
    from engram.coordinator.config import EngramConfig
    from engram.decoder.model import DecoderConfig, load_tokenizer
    from engram.evals.haystack import PASSKEY_QUESTION, first_integer, passkey_context

    tok = load_tokenizer(DecoderConfig())
    cfg = EngramConfig()
    cfg.cluster.num_cpus, cfg.cluster.shards = 2, 2
    cfg.shard.data_dir, cfg.server.metrics_port, cfg.server.http_port = tempfile.mkdtemp(), -1, -1
    for setting in sys.argv[1:]:
        path, value = setting.split("=")
        section, name = path.split(".")
        field = getattr(cfg, section)
        setattr(field, name, type(getattr(field, name))(value))
    srv = BackgroundServer(cfg).start()
    right = 0
    with EngramClient(srv.address, timeout=600) as c:
        for i, (tokens, depth, key) in enumerate(CASES):
            ns = f"n{i}"
            c.write([("doc", passkey_context(tokens, depth, key, tok))], namespace=ns)
            r = c.ask(PASSKEY_QUESTION, namespace=ns)
            ok = first_integer(r.answer) == key
            right += ok
            read = [(ch.chunk_id, round(ch.score, 3), str(key) in ch.text) for ch in r.chunks]
            print(f"{tokens} tokens, depth {depth}: {'right' if ok else 'WRONG'} {r.answer[:40]!r} read {read}")
    print(f"{right}/{len(CASES)} right with {sys.argv[1:] or 'the defaults'}")
    srv.stop()


if __name__ == "__main__":
    main()
