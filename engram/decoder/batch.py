"""Several asks decoded together: their assembled caches side by side, greedy steps for all rows at once, and
asks that arrive meanwhile joining between steps (continuous batching).

Each row keeps its own positions; padding (a shorter cache, a shorter question, a row that joined later) is masked
out, so a row computes what it would alone, up to float rounding. One pass over the weights serves every row: on a
CPU or a GPU the decoder is bound by reading weights at small batches, so B rows cost far less than B passes. That
is also why a newcomer's question is prefilled in the same forward pass as the running rows' next step (as vLLM
mixes prefill and decode), not in a pass of its own: a pass per arrival cost more than the joining saved
(BENCHMARKS.md, "Batched answers under load").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache

from .kv_cache import BufferLayer
from .model import with_cache


@dataclass
class Placement:
    """Rows' memory caches not yet in the batch's buffers: `length` entries per row that write(keys, values) puts
    into destinations [L, rows, H, length, D] — the batch's own buffers, so a new row's cache is never built apart
    and then copied in (at 16 rows of ~520 entries, zero-filling and copying the rows into the batch's buffers took
    a tenth of the batch's time; BENCHMARKS.md "Batched answers under load")."""

    length: int
    write: Callable[[torch.Tensor, torch.Tensor], None]
    like: torch.Tensor  # [L, 1, H, 1, D]: the entries' layers, heads, head dim, dtype and device
    rows: int = 1

    def get_seq_length(self) -> int:
        return self.length


@dataclass
class Row:
    """One ask as the batch takes it: its memory (a Placement of one row), its question's token ids, the position
    the question starts at, how many tokens it may generate, stop() (its caller gave up), optionally a bias on
    its logits to each cache entry, and a draft of its answer (draft.py: fewer than max_new_tokens tokens) read
    after the question in the same pass and kept as far as the model predicts it."""

    cache: Placement
    prompt: list[int]
    start: int
    max_new_tokens: int
    stop: Callable[[], bool]
    bias: torch.Tensor | None = None  # [S]: added to its attention logits to its cache's entries (retrieval_bias)
    draft: list[int] = field(default_factory=list)

    @property
    def new_tokens(self) -> list[int]:
        """What its first pass reads: the question, then the draft."""
        return self.prompt + self.draft


class _Batch:
    """The rows being decoded: one cache [B, H, S, D] per layer, the mask of its real entries [B, S], each row's
    next token [B] and next position [B], the tokens each row's last pass produced (one, or with a draft up to its
    length + 1), and which row (as numbered for the caller) each batch index holds."""

    def __init__(self):
        self.cache = None  # a cache of BufferLayer: kept across steps, each step's K/V written in place
        self.mask = self.token = self.next_pos = None
        self.bias = None  # [B, S] float, beside mask, while any row has a bias: every pass then takes a 4D mask
        self.ids: list[int] = []  # the row number at each batch index
        self.produced: list[list[int]] = []  # per batch index: the tokens of the last pass, in order
        self.rows: dict[int, Row] = {}  # row number -> its Row, while it runs

    def forward(self, model, new: list[Row], ids: list[int]) -> None:
        """One pass: each running row's token in, each new row's question and draft in (its cache joining the
        batch's, both left-padded to the longer), and every row's next token out; a new row's draft is checked
        against what the model predicts after each of its tokens, and the entries of the part it got wrong are
        masked out (they are never read)."""
        device = next(model.parameters()).device
        mask = self.mask
        running = len(self.ids)
        q = max([1] + [len(r.new_tokens) for r in new])
        if new:  # one copy of every row's cache into new buffers, with room for the steps to come
            lengths = [r.cache.get_seq_length() for r in new]
            n = max(lengths + ([mask.shape[1]] if running else []))
            room = q + max(r.max_new_tokens for r in [*new, *self.rows.values()])  # growing past it copies
            parts = [_copied([(layer.keys, layer.values) for layer in self.cache.layers])] if running else []
            parts += [r.cache for r in new]
            self.cache = _buffers(parts, n, room)
            masks = ([mask] if running else []) + [torch.ones(1, m, dtype=torch.long, device=device) for m in lengths]
            mask = torch.cat([_left_pad(m, n, 1) for m in masks])
            if self.bias is not None or any(r.bias is not None for r in new):
                old = [self.bias if self.bias is not None else torch.zeros(mask[:running].shape)] if running else []
                rows = [(r.bias if r.bias is not None else torch.zeros(m))[None].float() for r, m in zip(new, lengths)]
                self.bias = torch.cat([_left_pad(b.to(device), n, 1) for b in old + rows])
        tokens = torch.zeros(running + len(new), q, dtype=torch.long, device=device)
        pos = torch.zeros_like(tokens)
        real = torch.zeros_like(tokens)
        if running:  # questions and tokens right-aligned: every row's last column is its last real token
            tokens[:running, -1], pos[:running, -1], real[:running, -1] = self.token, self.next_pos, 1
        for i, r in enumerate(new, running):
            seq = r.new_tokens
            tokens[i, q - len(seq) :] = torch.tensor(seq, device=device)
            pos[i, q - len(seq) :] = torch.arange(r.start, r.start + len(seq), device=device)
            real[i, q - len(seq) :] = 1
        self.mask = torch.cat([mask, real], 1)  # [B, S + q]
        attention = self.mask
        if self.bias is not None:
            self.bias = torch.cat([self.bias, torch.zeros(real.shape, device=device)], 1)
            attention = biased_mask(self.mask, self.bias, q)
        drafted = max([0] + [len(r.draft) for r in new])
        out = model(
            input_ids=tokens,
            **with_cache(model, self.cache),
            position_ids=pos,
            attention_mask=attention,
            use_cache=True,
            # the last column is every row's last real token: the vocabulary projection only there (and over the
            # columns of drafts, whose every token's prediction is checked)
            logits_to_keep=1 + drafted,
        )
        predicted = out.logits.argmax(-1)  # [B, 1 + drafted]
        self.token = predicted[:, -1]
        self.produced = [[t] for t in self.token[:running].tolist()]
        starts = []
        for i, r in enumerate(new, running):
            k = len(r.draft)
            guess = predicted[i, drafted - k :].tolist()  # after the question's last token, then after each draft's
            kept = 0
            while kept < k and guess[kept] == r.draft[kept]:
                kept += 1
            self.produced.append(guess[: kept + 1])
            self.token[i] = guess[kept]
            if kept < k:
                self.mask[i, kept - k :] = 0  # the entries of the draft's wrong part: never attended to
            starts.append(r.start + len(r.prompt) + kept)
        self.next_pos = torch.cat(
            ([self.next_pos + 1] if running else []) + [torch.tensor(starts, dtype=torch.long, device=device)]
        )
        self.ids = self.ids + ids

    def keep(self, rows: list[int]) -> None:
        """Only these batch indices go on; cache columns no remaining row uses (padding) are dropped."""
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(0).nonzero().squeeze(1)
        for layer in self.cache.layers:
            layer.keep(index, used)
        self.mask = mask[:, used]
        if self.bias is not None:
            self.bias = self.bias.index_select(0, index)[:, used]
        self.token, self.next_pos = self.token.index_select(0, index), self.next_pos.index_select(0, index)
        self.ids = [self.ids[r] for r in rows]


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
    up to `free` more (max_rows less the rows running or held; max_rows 0 = no limit). Those are held until
    joining is worth its padding (worth_joining), then their questions are prefilled in a step's pass."""
    batch = _Batch()
    made: dict[int, int] = {}  # row number -> tokens generated
    held: list[tuple[int, Row]] = []  # admitted, not yet joined: (row number, row)
    new, numbered = list(enumerate(rows)), len(rows)
    while True:
        made.update((r, 0) for r, _ in new)
        batch.forward(model, [row for _, row in new], [r for r, _ in new])
        batch.rows.update(new)
        live = []
        for b, r in enumerate(batch.ids):
            ended = False
            for tid in batch.produced[b]:  # one token, or a draft's kept tokens and the one after them
                ended = tid == eos_id
                if ended:
                    break
                made[r] += 1
                yield r, tid
                ended = made[r] >= batch.rows[r].max_new_tokens or batch.rows[r].stop()
                if ended:
                    break
            if ended:
                yield r, None
                del batch.rows[r]
            else:
                live.append(b)
        free = max_rows - len(live) - len(held) if max_rows else 1 << 30
        for row in admit(free) if admit is not None and free > 0 else []:
            held.append((numbered, row))
            numbered += 1
        gave_up = [h[1].stop() for h in held]  # asked once: a row that gives up in between is never lost
        for (r, _), gone in zip(held, gave_up):
            if gone:  # gave up while held: never decoded
                yield r, None
        held = [h for h, gone in zip(held, gave_up) if not gone]
        new, held = (held, []) if worth_joining(len(live), [row for _, row in held]) else ([], held)
        if not live and not new:
            if not held:
                return
            new, held = held, []
        if not live:
            batch = _Batch()
        elif len(live) < len(batch.ids):
            batch.keep(live)


def worth_joining(running: int, rows: list[Row]) -> bool:
    """Whether held rows join now: their questions (q tokens at most) are prefilled in the running rows' next pass,
    which pads each running row's one token to q. On a CPU that padding is computed like real tokens, so rows join
    once it costs no more than their own questions (and at once into an empty batch); until then they wait (the
    running rows leaving, or more rows arriving)."""
    if not rows:
        return False
    q = max(len(r.new_tokens) for r in rows)
    return running * (q - 1) <= sum(len(r.new_tokens) for r in rows)


def biased_mask(mask: torch.Tensor, bias: torch.Tensor, q: int) -> torch.Tensor:
    """The 4D float mask [B, 1, q, S] of a pass whose last q columns are new: each query sees the entries its row's
    mask allows, the new ones causally, with bias [B, S] added; what it may not see is -inf."""
    s = mask.shape[1]
    allowed = mask.bool()[:, None, :].expand(-1, q, -1).clone()  # [B, q, S]
    allowed[:, :, s - q :] &= torch.ones(q, q, dtype=torch.bool, device=mask.device).tril()
    out = bias[:, None, :].expand(-1, q, -1).masked_fill(~allowed, float("-inf"))
    return out[:, None]


def _left_pad(x: torch.Tensor, n: int, dim: int = 2) -> torch.Tensor:
    """x with zeros before its entries along `dim` (the sequence: 2 for a cache [B, H, S, D], 1 for a mask) up to n."""
    pad = n - x.shape[dim]
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x.new_zeros(shape), x], dim)


def _copied(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> Placement:
    """Caches already assembled (per layer (keys, values) [b, H, S, D]: the running batch's) as a Placement."""
    k0 = layers[0][0]
    like = k0[:1, :, :1][None].expand(len(layers), -1, -1, -1, -1)  # [L, 1, H, 1, D], no copy

    def write(keys: torch.Tensor, values: torch.Tensor) -> None:  # [L, b, H, S, D]
        for i, (k, v) in enumerate(layers):
            keys[i], values[i] = k, v

    return Placement(k0.shape[2], write, like, k0.shape[0])


def _buffers(parts: list, n: int, room: int) -> Cache:
    """Several rows' caches stacked into one batch cache of BufferLayer: each left-padded with zeros to n entries,
    then `room` free entries after them (uninitialised: each is written before it is read). A part is a Placement,
    written straight into its place, or a cache's per-layer (keys, values) [b, H, S, D], copied in."""
    parts = [p if isinstance(p, Placement) else _copied(p) for p in parts]
    like = parts[0].like  # [L, 1, H, 1, D]
    shape = (like.shape[0], sum(p.rows for p in parts), like.shape[2], n + room, like.shape[4])
    kb, vb = like.new_empty(shape), like.new_empty(shape)  # [L, B, H, n + room, D]
    row = 0
    for p in parts:
        rows, pad = slice(row, row + p.rows), n - p.length
        kb[:, rows, :, :pad], vb[:, rows, :, :pad] = 0, 0
        p.write(kb[:, rows, :, pad:n], vb[:, rows, :, pad:n])
        row += p.rows
    return Cache(layers=[BufferLayer(kb[i], vb[i], n) for i in range(shape[0])])
