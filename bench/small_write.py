"""CPU time of one small write in an encoder (as `engram load` writes them: a ~45-token note, one chunk shorter than
its windows): Encoder.encode on one thread, median of 10 after 3 warm-ups.

    .venv/bin/python bench/small_write.py
"""

import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from engram.decoder.layout import BlockLayout
from engram.decoder.model import DecoderConfig, model_config
from engram.workers.encoder import Encoder, EncoderConfig


def main() -> None:
    torch.set_num_threads(1)
    dec = DecoderConfig(threads=1)
    enc = Encoder(EncoderConfig(), dec, BlockLayout.of(model_config(dec), 128, 0, "int4"))
    rng = random.Random(0)

    def write() -> float:
        text = f"Client 3 note 7: the shelf code is {rng.randint(1000, 9999)}. " * 3
        ids = enc.tokenizer(text, add_special_tokens=False).input_ids
        t0 = time.perf_counter()
        enc.encode([ids], [b"0" * 16])
        return time.perf_counter() - t0

    for _ in range(3):
        write()
    times = sorted(write() for _ in range(10))
    print(f"one small write encoded, 1 thread: median {times[5] * 1000:.1f} ms")


if __name__ == "__main__":
    main()
