"""Several asks decoded together: their assembled caches side by side, greedy steps for all rows at once, and
asks that arrive meanwhile joining between steps (continuous batching).

Each row keeps its own positions; padding (a shorter cache, a shorter question, a row that joined later) is masked
out, so a row computes what it would alone, up to float rounding. One pass over the weights serves every row: on a
CPU or a GPU the decoder is bound by reading weights at batch 1, so B rows cost far less than B passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


@dataclass
class Row:
    """One ask as the batch takes it: its assembled memory cache ([1, H, S, D] per layer), its question's token
    ids, the position the question starts at, how many tokens it may generate, and stop() (its caller gave up)."""

    cache: object
    prompt: list[int]
    start: int
    max_new_tokens: int
    stop: Callable[[], bool]


def stack_caches(caches: list) -> tuple:
    """Per-ask DynamicCaches ([1, H, S_r, D] per layer) -> one [B, H, S, D] cache, each row left-padded to the
    longest, and the mask of real entries [B, S]."""
    first = caches[0].layers[0].keys
    longest = max(c.get_seq_length() for c in caches)
    valid = torch.zeros(len(caches), longest, dtype=torch.long, device=first.device)
    for r, c in enumerate(caches):
        valid[r, longest - c.get_seq_length() :] = 1
    layers = [
        (torch.cat([_left_pad(c.layers[i].keys, longest) for c in caches]),
         torch.cat([_left_pad(c.layers[i].values, longest) for c in caches]))
        for i in range(len(caches[0].layers))
    ]  # fmt: skip
    return _cache(layers), valid


class _Running:
    """The rows being decoded: one cache [B, H, S, D] per layer, the mask of its real entries [B, S], each row's
    next token [B] and next position [B], and which row (as numbered for the caller) each batch index holds."""

    def __init__(self, cache, mask: torch.Tensor, token: torch.Tensor, next_pos: torch.Tensor, ids: list[int]):
        self.cache, self.mask, self.token, self.next_pos, self.ids = cache, mask, token, next_pos, ids

    def step(self, model) -> None:
        """One greedy step for every row: each row's token goes in, its next one comes out."""
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], 1)
        out = model(
            input_ids=self.token[:, None],
            past_key_values=self.cache,
            position_ids=self.next_pos[:, None],
            attention_mask=self.mask,
            use_cache=True,
        )
        self.token, self.next_pos = out.logits[:, -1].argmax(-1), self.next_pos + 1

    def keep(self, rows: list[int]) -> None:
        """Only these batch indices go on; columns no remaining row uses (left padding of rows gone) are dropped."""
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        first = int(mask.any(0).long().argmax())  # the first column a remaining row uses
        layers = [
            (layer.keys.index_select(0, index)[:, :, first:], layer.values.index_select(0, index)[:, :, first:])
            for layer in self.cache.layers
        ]
        self.cache, self.mask = _cache(layers), mask[:, first:]
        self.token, self.next_pos = self.token.index_select(0, index), self.next_pos.index_select(0, index)
        self.ids = [self.ids[r] for r in rows]

    def join(self, other: _Running) -> None:
        """The other rows after these, both left-padded to the longer cache."""
        n = max(self.mask.shape[1], other.mask.shape[1])
        layers = [
            (torch.cat([_left_pad(a.keys, n), _left_pad(b.keys, n)]),
             torch.cat([_left_pad(a.values, n), _left_pad(b.values, n)]))
            for a, b in zip(self.cache.layers, other.cache.layers)
        ]  # fmt: skip
        self.cache = _cache(layers)
        self.mask = torch.cat([_left_pad(self.mask, n, dim=1), _left_pad(other.mask, n, dim=1)])
        self.token, self.next_pos = torch.cat([self.token, other.token]), torch.cat([self.next_pos, other.next_pos])
        self.ids = self.ids + other.ids


def prefill_rows(model, rows: list[Row], ids: list[int]) -> _Running:
    """The rows' questions prefilled over their stacked caches, right-aligned: every row's last column is its last
    real token -> the running state, each row's first token known."""
    device = next(model.parameters()).device
    cache, valid = stack_caches([r.cache for r in rows])
    q = max(len(r.prompt) for r in rows)
    tokens = torch.zeros(len(rows), q, dtype=torch.long, device=device)
    pos = torch.zeros(len(rows), q, dtype=torch.long, device=device)
    real = torch.zeros(len(rows), q, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        tokens[i, q - len(r.prompt) :] = torch.tensor(r.prompt, device=device)
        pos[i, q - len(r.prompt) :] = torch.arange(r.start, r.start + len(r.prompt), device=device)
        real[i, q - len(r.prompt) :] = 1
    mask = torch.cat([valid, real], 1)  # [B, S + Q]
    out = model(input_ids=tokens, past_key_values=cache, position_ids=pos, attention_mask=mask, use_cache=True)
    next_pos = torch.tensor([r.start + len(r.prompt) for r in rows], device=device)
    return _Running(out.past_key_values, mask, out.logits[:, -1].argmax(-1), next_pos, ids)


def generate_batch(
    model,
    rows: list[Row],
    eos_id: int | None,
    admit: Callable[[int], list[Row]] | None = None,
    max_rows: int = 0,
) -> Iterator[tuple[int, int | None]]:
    """Greedy decoding of several asks at once: yields (row, token id) as each token is known, and (row, None) once
    a row has ended (end of sequence, its max_new_tokens, or its stop() said so); an ended row leaves the batch.
    Rows are numbered in the order given, then in the order admitted: after each step admit(free) may hand over
    up to `free` more (max_rows - rows running; max_rows 0 = no limit), which are prefilled and join the batch."""
    state = prefill_rows(model, rows, list(range(len(rows))))
    made, limits, stops = [0] * len(rows), [r.max_new_tokens for r in rows], [r.stop for r in rows]
    while True:
        live = []
        for b, r in enumerate(state.ids):
            tid = int(state.token[b])
            ended = tid == eos_id
            if not ended:
                made[r] += 1
                yield r, tid
                ended = made[r] >= limits[r] or stops[r]()
            if ended:
                yield r, None
            else:
                live.append(b)
        if live:
            if len(live) < len(state.ids):
                state.keep(live)
            state.step(model)
        free = max_rows - len(live) if max_rows else 1 << 30
        new = admit(free) if admit is not None and free > 0 else []
        if new:
            ids = list(range(len(made), len(made) + len(new)))
            made += [0] * len(new)
            limits += [r.max_new_tokens for r in new]
            stops += [r.stop for r in new]
            joined = prefill_rows(model, new, ids)
            if live:
                state.join(joined)
            else:
                state = joined
        elif not live:
            return


def _left_pad(x: torch.Tensor, n: int, dim: int = 2) -> torch.Tensor:
    """x with zeros before its entries along `dim` (the sequence: 2 for a cache [B, H, S, D], 1 for a mask) up to n."""
    pad = n - x.shape[dim]
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x.new_zeros(shape), x], dim)


def _cache(layers: list[tuple[torch.Tensor, torch.Tensor]]):
    from transformers import DynamicCache

    out = DynamicCache()
    for i, (k, v) in enumerate(layers):
        out.update(k, v, i)
    return out
