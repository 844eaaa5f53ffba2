"""Stored K/V quantisation against a slow, obviously-correct reference (vLLM-style grid)."""

import zlib

import numpy as np
import pytest
import torch

from engram.decoder import quant
from engram.decoder.layout import KV_DTYPES, BlockLayout
from engram.workers.block_store import EncodedBlocks
from engram.workers.store import ShardStore


def reference(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Round every element to the nearest of 2**bits evenly spaced levels spanning its group's [min, max]
    (the lowest level and the spacing stored as fp16, as the format keeps them)."""
    out = torch.empty_like(x, dtype=torch.float32)
    moved, res = x.float().movedim(dim, -1), out.movedim(dim, -1)
    for idx in np.ndindex(*moved.shape[:-1]):
        g = moved[idx]
        lo, hi = float(g.min()), float(g.max())
        step = float(np.float16(max((hi - lo) / (2**bits - 1), 2**-14)))
        levels = float(np.float16(lo)) + step * torch.arange(2**bits)
        res[idx] = levels[(g[:, None] - levels[None]).abs().argmin(1)]
    return out


@pytest.mark.parametrize("kv_dtype", ["int8", "int4", "int2"])
@pytest.mark.parametrize("shape", [(2, 3, 8, 16), (1, 1, 5, 64), (3, 2, 1, 8)])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_pack_matches_reference(kv_dtype, shape, scale):
    g = torch.Generator().manual_seed(zlib.crc32(repr((kv_dtype, shape, scale)).encode()))
    keys = torch.randn(shape, generator=g) * scale
    keys[..., 3] += 8 * scale  # an outlier channel, as real keys have
    values = torch.randn(shape, generator=g)
    packed = quant.pack_kv(keys, values, kv_dtype)
    k, v = quant.unpack_kv(packed, kv_dtype)
    bits = KV_DTYPES[kv_dtype]
    for got, x, dim in ((k, keys, -2), (v, values, -1)):
        lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
        step = (hi - lo) / (2**bits - 1)
        fp16 = (lo.abs() + hi.abs()) * 1e-3  # the stored range is rounded to fp16
        assert ((got - x).abs() <= step / 2 + fp16).all()  # within half a level of the input
        torch.testing.assert_close(got, reference(x, bits, dim), rtol=1e-6, atol=1e-5 * scale)


def test_float16_is_exact_and_unknown_dtype_refused():
    x = torch.randn(2, 3, 4, 8)
    packed = quant.pack_kv(x, x, "float16")
    assert set(packed) == {"keys", "values"}
    torch.testing.assert_close(quant.unpack_kv(packed, "float16")[0], x.half().float())
    with pytest.raises(ValueError, match="kv_dtype must be one of float16, int8, int4, int2"):
        quant.pack_kv(x, x, "int3")


@pytest.mark.parametrize("kv_dtype", ["int8", "int4", "int2"])
def test_quantised_blocks_round_trip_through_the_store(tmp_path, kv_dtype):
    layout = BlockLayout(
        layers=2, kv_heads=3, keep_tokens=4, head_dim=8, chunk_tokens=4, latent_dim=6, kv_dtype=kv_dtype
    )
    keys, values = torch.randn(3, 2, 3, 4, 8), torch.randn(3, 2, 3, 4, 8)
    batch = {name: t.numpy() for name, t in quant.pack_kv(keys, values, kv_dtype).items()}
    for name, (shape, dtype) in layout.kv_columns().items():
        assert batch[name].shape == (3, *shape) and batch[name].dtype == np.dtype(dtype), name
    batch["positions"] = np.ones((3, 2, 3, 4), np.int16)
    store = ShardStore(tmp_path, layout)
    store.blocks.put(
        EncodedBlocks(
            batch,
            tokens=np.zeros((3, 4), np.int32),
            length=np.full(3, 4, np.int32),
            hash=np.arange(48, dtype=np.uint8).reshape(3, 16),
            latent=np.zeros((3, 1, 6), np.float32),
            text=np.array(["a", "b", "c"], dtype=object),
        )
    )
    store.commit()
    got = ShardStore(tmp_path, layout).blocks.get([1])
    assert set(got) == set(layout.block_columns)
    k, v = quant.unpack_kv({n: torch.from_numpy(c[0]) for n, c in got.items() if n != "positions"}, kv_dtype)
    k_ref, v_ref = quant.unpack_kv({n: torch.from_numpy(c[1]) for n, c in batch.items() if n in got}, kv_dtype)
    torch.testing.assert_close(k, k_ref, rtol=0, atol=0)
    torch.testing.assert_close(v, v_ref, rtol=0, atol=0)
    with pytest.raises(Exception, match="kv_dtype"):  # a store keeps the dtype it was written with
        ShardStore(tmp_path, BlockLayout(2, 3, 4, 8, 4, 6, kv_dtype="float16"))
