"""A KV cache layer that is written in place: K/V in buffers [B, H, capacity, D], each forward pass writing its new
entries after the filled part. transformers' DynamicLayer concatenates instead, copying the whole cache at every
step: on a CPU, at 16 rows of ~530 entries, that copying cost more than the model's matmuls (BENCHMARKS.md
"Batched answers under load"). Plain DynamicLayer semantics otherwise: every entry is attended (masks come from
the caller), no sliding window."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class BufferLayer(DynamicLayer):
    """One layer: K/V buffers [B, H, capacity, D] that each pass writes into in place; keys/values are views of the
    filled part [B, H, end, D]."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, end: int):
        super().__init__()
        self.k_buf, self.v_buf, self.end = keys, values, end
        self.device, self.is_initialized = keys.device, True
        self._views()

    def _views(self) -> None:
        self.keys, self.values = self.k_buf[:, :, : self.end], self.v_buf[:, :, : self.end]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        q = key_states.shape[-2]
        if self.end + q > self.k_buf.shape[2]:  # out of room (a row longer than planned): grow, doubling
            grow = max(q, self.k_buf.shape[2])
            self.k_buf, self.v_buf = (with_room(b[:, :, : self.end], grow) for b in (self.k_buf, self.v_buf))
        self.k_buf[:, :, self.end : self.end + q] = key_states
        self.v_buf[:, :, self.end : self.end + q] = value_states
        self.end += q
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.end

    def keep(self, index: torch.Tensor, used: torch.Tensor) -> None:
        """Only the rows `index` and the columns `used` stay (a copy: rows leave far more rarely than steps run)."""
        room = self.k_buf.shape[2] - self.end
        k, v = (x.index_select(0, index)[:, :, used] for x in (self.keys, self.values))
        self.end = k.shape[2]
        self.k_buf, self.v_buf = (with_room(x, room) for x in (k, v))
        self._views()


def with_room(x: torch.Tensor, room: int) -> torch.Tensor:
    """x [B, H, S, D] followed by `room` free entries (uninitialised: never read before written)."""
    out = x.new_empty(*x.shape[:2], x.shape[2] + room, x.shape[3])
    out[:, :, : x.shape[2]] = x
    return out


def cache_of(keys: torch.Tensor, values: torch.Tensor, end: int) -> Cache:
    """A cache over buffers holding every layer ([L, B, H, capacity, D]; entries :end filled)."""
    return Cache(layers=[BufferLayer(k, v, end) for k, v in zip(keys, values)])
