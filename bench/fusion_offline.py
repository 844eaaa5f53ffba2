"""Fusions of dense and lexical scores compared offline, on the candidates `bench/distinct_retrieval.py` saved
(issue #13): recall@k of the answer's chunk, the service's score cutoff applied after fusion, the chunk beside a
hit read as an Ask reads it (`ask.adjacent_lexical`).

Each saved fact holds every shard's candidates at depth 64 with their dense cosine and BM25 / the query's best
BM25, plus that best BM25 and the query's summed idf (the BM25 of an average-length text holding each query term
once). So the BM25 can be put on either scale:

- max-norm:  BM25 / the best BM25 of the query's candidates (the default before: 1.0 for the best match however
  weak it is);
- coverage:  min(1, BM25 / the query's summed idf): the share of the query's information a text matches (a UUID
  key's five rare parts dominate its question's idf; a paraphrase's few shared common words stay small).

    python bench/fusion_offline.py bench/results/distinct_retrieval_coverage.json
"""

from __future__ import annotations

import argparse
import json


def ranked(fact: dict, kind: str, w: float, w2: float, top_k: int, ratio: float, adjacent_min: float):
    """The fact's saved candidates fused as the service fuses them (`ask.fuse`, `top_hits`, `adjacent`): -> (top k
    after the score cutoff, the chunks beside them read too). kind "max" / "cov" / "cov^p" (w2: the power) are the
    service's scales; "max+cov" (w x max-norm + w2 x coverage) exists only here."""
    from engram.coordinator.ask import Retrieved, adjacent, fuse, top_hits

    def hits():  # the raw BM25 back from BM25 / the best
        return [
            Retrieved(d, 0, i, doc, seq, 0, dense=d, lexical=lex * fact["lexical_best"])
            for i, (doc, seq, d, lex) in enumerate(fact["deep"])
        ]

    idf = fact["lexical_idf"]
    if kind == "max+cov":
        by_max, by_cov = fuse(hits(), w), fuse(hits(), w2, "coverage", idf)
        every = by_max
        for h, c in zip(every, by_cov):
            h.score += c.score - c.dense
    else:
        scale, power = ("max", 1.0) if kind == "max" else ("coverage", w2 if kind == "cov^p" else 1.0)
        every = fuse(hits(), w, scale, idf, power)
    every.sort(key=lambda h: -h.score)
    top = top_hits(every, top_k, ratio)
    return top, adjacent(every, top, adjacent_min)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", help="distinct_retrieval JSON files (saved with lexical_best/lexical_idf)")
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--ratio", type=float, default=0.3, help="ask.min_score_ratio")
    p.add_argument("--adjacent", type=float, default=0.4, help="ask.adjacent_lexical")
    a = p.parse_args()
    variants = [("max", w, 0.0) for w in (0.1, 0.25, 0.5, 1.0)]
    variants += [("cov", w, 0.0) for w in (0.25, 0.5, 0.75, 1.0, 1.5)]
    variants += [("max+cov", 0.25, w2) for w2 in (0.25, 0.5, 1.0)]
    variants += [("cov^p", w, p) for p in (2, 3, 4) for w in (1.0, 2.0, 3.0)]
    cases = []
    for path in a.results:
        for length in json.load(open(path))["lengths"]:
            cases.append((f"{path.split('/')[-1]}:{length['length']:,}", length["facts"]))
    print("| fusion | " + " | ".join(f"{name} top {a.top_k} / read" for name, _ in cases) + " | misses |")
    print("|---" * (len(cases) + 2) + "|")
    for kind, w, w2 in variants:
        cells, misses = [], []
        for _name, facts in cases:
            top_n = read_n = 0
            for f in facts:
                top, beside = ranked(f, kind, w, w2, a.top_k, a.ratio, a.adjacent)
                answer = {(f["document"], q) for q in f["answer_chunks"]}
                in_top = any((h.document_id, h.seq) in answer for h in top)
                in_read = in_top or any((h.document_id, h.seq) in answer for h in beside)
                top_n += in_top
                read_n += in_read
                if not in_top:
                    misses.append(f"{f['kind']}{'' if in_read else '!'}")
            cells.append(f"{top_n}/{len(facts)} / {read_n}/{len(facts)}")
        label = f"{kind} w={w}" + (f" p={w2:g}" if kind == "cov^p" else f" w2={w2}" if w2 else "")
        print(f"| {label} | " + " | ".join(cells) + f" | {', '.join(misses)} |")


if __name__ == "__main__":
    main()
