"""The decoder worker as a Ray actor: the one thing it adds is telling the worker when its caller gave up."""

from __future__ import annotations

import ray

from ..workers.decoder_worker import DecoderWorker


class DecoderActor(DecoderWorker):
    def cancelled(self) -> bool:
        # ray.cancel() on a call to a synchronous actor drops nothing from its queue: it sets this flag, which the
        # call sees when it starts (and the generation loop before each token)
        return ray.get_runtime_context().is_canceled()
