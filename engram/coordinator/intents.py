"""Write intents: a durable note, per document being written, of what a crash would leave half-committed.

A write records its intent (namespace, document, identity) before the first shard commits and removes it once every
shard has committed or the write was rolled back, always before the client's acknowledgement. A coordinator that
starts and finds intents repairs each one: it removes that write's chunks from every shard (only chunks of that
identity: a document another request acknowledged is never touched). A write that was not acknowledged may thus
vanish; an acknowledged one never does, and none is ever served half-written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..durable import fsync_dir, write_atomically


@dataclass(frozen=True)
class Intent:
    namespace: str
    name: str
    identity: str


class IntentLog:
    def __init__(self, data_dir: str, fsync: bool = True):
        self.dir, self.fsync = Path(data_dir) / "intents", fsync
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, intent: Intent) -> Path:
        key = hashlib.blake2b(f"{intent.namespace}\0{intent.name}".encode(), digest_size=16).hexdigest()
        return self.dir / f"{key}.json"

    def begin(self, intent: Intent) -> None:
        write_atomically(self._path(intent), json.dumps(asdict(intent)), self.fsync)

    def end(self, intent: Intent) -> None:
        self._path(intent).unlink(missing_ok=True)
        if self.fsync:
            fsync_dir(self.dir)

    def pending(self) -> list[Intent]:
        out = []
        for p in sorted(self.dir.glob("*.json")):
            try:
                out.append(Intent(**json.loads(p.read_text())))
            except (ValueError, TypeError):  # torn before its rename cannot happen; anything else is not ours
                continue
        return out
