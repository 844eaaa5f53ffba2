"""What a short chunk costs to encode (a small document, a document's last chunk): the encoding pass over one chunk
of N tokens (bf16 autocast where native, as the encoders run it; 1 torch thread, as one encoder uses), median of
repeats. Run it against two checkouts to compare them (PYTHONPATH picks the engram package):

    PYTHONPATH=. python bench/short_chunks.py --out bench/results/short_chunks_after
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", type=int, nargs="+", default=[16, 45, 64, 96, 128])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default="bench/results/short_chunks")
    args = p.parse_args()

    import engram
    from engram.decoder import blocks as kv
    from engram.decoder.layout import BlockLayout
    from engram.decoder.model import DecoderConfig, encoding_autocast, load, sink_token_id

    torch.set_num_threads(1)
    model, tok = load(DecoderConfig(threads=1))
    layout = BlockLayout.of(model.config, 128, 0, "int4")
    ids = tok("The harbour master logs every ship that enters the bay. " * 40, add_special_tokens=False).input_ids
    rows = []
    for n in args.lengths:
        times = []
        for r in range(args.repeats + 2):
            t0 = time.perf_counter()
            with torch.inference_mode(), encoding_autocast("auto", model):
                kv.encode_chunks(model, sink_token_id(tok), [ids[r : r + n]], layout, scorer="key_norm")
            if r >= 2:  # the first two warm up
                times.append(time.perf_counter() - t0)
        rows.append({"tokens": n, "encode_s_median": round(statistics.median(times), 4)})
        print(rows[-1])
    with open(args.out + ".json", "w") as f:
        json.dump({"engram": engram.__file__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
