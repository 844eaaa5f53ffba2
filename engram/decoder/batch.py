"""Several asks decoded together: their assembled caches side by side, greedy steps for all rows at once.

Each row keeps its own positions; padding (a shorter cache, a shorter question) is masked out, so a row computes
what it would alone, up to float rounding. One pass over the weights serves every row: on a CPU or a GPU the
decoder is bound by reading weights at batch 1, so B rows cost far less than B passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch


def stack_caches(caches: list) -> tuple:
    """Per-ask DynamicCaches ([1, H, S_r, D] per layer) -> one [B, H, S, D] cache, each row left-padded to the
    longest, and the mask of real entries [B, S]."""
    from transformers import DynamicCache

    longest = max(c.get_seq_length() for c in caches)
    first = caches[0].layers[0].keys
    valid = torch.zeros(len(caches), longest, dtype=torch.long, device=first.device)
    for r, c in enumerate(caches):
        valid[r, longest - c.get_seq_length() :] = 1
    out = DynamicCache()
    for layer in range(len(caches[0].layers)):
        keys, values = [], []
        for c in caches:
            k, v = c.layers[layer].keys, c.layers[layer].values
            pad = longest - k.shape[2]
            keys.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
            values.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
        out.update(torch.cat(keys), torch.cat(values), layer)
    return out, valid


def generate_batch(
    model,
    caches: list,
    prompts: list[list[int]],
    starts: list[int],
    max_new_tokens: list[int],
    eos_id: int | None,
    stops: list[Callable[[], bool]],
) -> Iterator[tuple[int, int | None]]:
    """Greedy decoding of B asks at once: yields (row, token id) as each token is known, and (row, None) once a
    row has ended (end of sequence, its max_new_tokens, or its stop() said so). Rows that ended ride along
    masked until the last one ends."""
    device = next(model.parameters()).device
    b = len(prompts)
    cache, valid = stack_caches(caches)
    q = max(len(p) for p in prompts)
    ids = torch.zeros(b, q, dtype=torch.long, device=device)
    pos = torch.zeros(b, q, dtype=torch.long, device=device)
    real = torch.zeros(b, q, dtype=torch.long, device=device)
    for r, p in enumerate(prompts):  # questions right-aligned: every row's last column is its last real token
        ids[r, q - len(p) :] = torch.tensor(p, device=device)
        pos[r, q - len(p) :] = torch.arange(starts[r], starts[r] + len(p), device=device)
        real[r, q - len(p) :] = 1
    mask = torch.cat([valid, real], 1)  # [B, S + Q]
    out = model(input_ids=ids, past_key_values=cache, position_ids=pos, attention_mask=mask, use_cache=True)
    token = out.logits[:, -1].argmax(-1)  # [B]
    next_pos = torch.tensor([s + len(p) for s, p in zip(starts, prompts)], device=device)
    made, live = [0] * b, [True] * b
    while True:
        for r in range(b):
            if not live[r]:
                continue
            tid = int(token[r])
            if tid == eos_id:
                live[r] = False
            else:
                made[r] += 1
                yield r, tid
                live[r] = made[r] < max_new_tokens[r] and not stops[r]()
            if not live[r]:
                yield r, None
        if not any(live):
            return
        mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=device)], 1)
        step = model(
            input_ids=token[:, None],
            past_key_values=cache,
            position_ids=next_pos[:, None],
            attention_mask=mask,
            use_cache=True,
        )
        token, next_pos = step.logits[:, -1].argmax(-1), next_pos + 1
