"""The transform codec for stored K/V (engram/decoder/codec.py): its parts against slow, obviously-correct
references."""

import itertools

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from engram.decoder import codec as kvc


def _codec(bits: np.ndarray, levels: np.ndarray, heads=2, head_dim=4, gain=False) -> kvc.Codec:
    two, layers, f = bits.shape
    basis = np.broadcast_to(np.eye(f, dtype=np.float32), (two, layers, f, f)).copy()
    return kvc.Codec(np.zeros((two, layers, f), np.float32), basis, bits, levels, heads, head_dim, gain)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_codes_round_trip_exactly(seed):
    """Values that sit on their component's levels come back bit for bit, whatever bits each component has."""
    rng = np.random.default_rng(seed)
    layers, heads, head_dim = 3, 2, 4
    f = heads * head_dim
    bits = rng.integers(0, kvc.MAX_BITS + 1, size=(2, layers, f)).astype(np.uint8)
    levels = np.zeros((2, layers, f, 2**kvc.MAX_BITS), np.float32)
    for i in np.ndindex(*bits.shape):
        levels[i][: 2 ** bits[i]] = np.sort(rng.normal(size=2 ** bits[i])) if bits[i] else 0
    c = _codec(bits, levels, heads, head_dim)
    n = 37
    idx = rng.integers(0, 2 ** bits.astype(np.int64), size=(n, *bits.shape))  # [N, 2, L, F]
    x = np.take_along_axis(levels[None], idx[..., None], -1)[..., 0]
    keys, values = (torch.from_numpy(x[:, k].reshape(n, layers, heads, head_dim)) for k in (0, 1))
    codes = c.encode(keys, values)
    assert codes.shape == (n, c.row_bytes) and codes.dtype == np.uint8
    planes = sum(int(b) for b in np.unique(bits) if b)  # one bit plane per bit of each width in use
    assert c.bits_per_token <= c.row_bytes * 8 < c.bits_per_token + 8 * planes  # under a byte of padding each
    k2, v2 = c.decode(codes)
    assert torch.equal(k2, keys) and torch.equal(v2, values)


def _lloyd_reference(x: np.ndarray, k: int, iters: int) -> np.ndarray:
    levels = np.sort(x)[((np.arange(k) + 0.5) * len(x) / k).astype(int)]
    for _ in range(iters):
        assign = np.abs(x[:, None] - levels[None]).argmin(1)
        levels = np.sort([x[assign == j].mean() if (assign == j).any() else levels[j] for j in range(k)])
    return levels


@pytest.mark.parametrize("k", [2, 4, 8])
def test_lloyd_max_matches_plain_k_means(k):
    rng = np.random.default_rng(k)
    x = np.concatenate([rng.normal(size=(3, 500)), rng.laplace(size=(2, 500))]).astype(np.float64)
    levels, err = kvc.lloyd_max(torch.from_numpy(x).float(), k, iters=30)
    for row, lv, e in zip(x, levels, err):
        ref = _lloyd_reference(row.astype(np.float32).astype(np.float64), k, 30)
        assert_close(lv.double(), torch.from_numpy(ref), atol=1e-4, rtol=1e-4)
        q = ref[np.abs(row[:, None] - ref[None]).argmin(1)]
        assert_close(float(e), float(((row - q) ** 2).mean()), atol=1e-5, rtol=1e-4)


def test_allocation_is_optimal_for_convex_errors():
    """Greedy bit allocation equals the brute-force best allocation when each error is convex in its bits."""
    rng = np.random.default_rng(0)
    var = rng.uniform(0.1, 4.0, size=4)
    err = torch.from_numpy(var[:, None] * 4.0 ** -np.arange(kvc.MAX_BITS + 1)[None])  # D(b) = var * 2^(-2b)
    for budget in range(0, 10):
        got = kvc.allocate(err, budget)
        best = min(
            (a for a in itertools.product(range(kvc.MAX_BITS + 1), repeat=4) if sum(a) == budget),
            key=lambda a: sum(err[i, b] for i, b in enumerate(a)),
        )
        assert got.sum() == budget
        assert_close(
            sum(float(err[i, b]) for i, b in enumerate(got)), sum(float(err[i, b]) for i, b in enumerate(best))
        )


def _correlated(n=3000, layers=4, heads=2, head_dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = heads * head_dim
    scale = torch.logspace(0, -2, f)
    mix = torch.linalg.qr(torch.randn(f, f, generator=g))[0]
    k = (torch.randn(n, layers, f, generator=g) * scale) @ mix + 3.0
    v = (torch.randn(n, layers, f, generator=g) * scale.flip(0).sqrt()) @ mix.T
    return k.reshape(n, layers, heads, head_dim), v.reshape(n, layers, heads, head_dim)


@pytest.mark.parametrize("gain, group", [(False, 1), (True, 1), (False, 2), (True, 4)])
def test_error_falls_with_the_budget(gain, group):
    k, v = _correlated()
    cal = kvc.calibrate(k[:2000], v[:2000], gain=gain, group=group)
    held_k, held_v = k[2000:], v[2000:]
    errors = []
    for per_value in (1, 2, 4):
        c = cal.codec(per_value * k[0].numel() * 2)
        k2, v2 = c.decode(c.encode(held_k, held_v))
        errors.append(float(((k2 - held_k).norm() + (v2 - held_v).norm()) / (held_k.norm() + held_v.norm())))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.05


def test_gain_carries_each_vector_norm():
    k, v = _correlated()
    c = kvc.calibrate(k, v, gain=True).codec(2 * k[0].numel() * 2)
    mean_k = torch.from_numpy(c.mean[0]).view(k.shape[1:])
    loud = mean_k + (k[:50] - mean_k) * 8.0  # the same directions, 8 times as far from the mean
    k1, _ = c.decode(c.encode(k[:50], v[:50]))
    k8, _ = c.decode(c.encode(loud, v[:50]))
    assert_close(k8 - mean_k, (k1 - mean_k) * 8.0, atol=0.05, rtol=0.02)


def test_group_must_divide_the_layers():
    k, v = _correlated(n=300, layers=3)
    with pytest.raises(ValueError, match="does not divide"):
        kvc.calibrate(k, v, group=2)


def test_save_and_load(tmp_path):
    k, v = _correlated(n=500)
    c = kvc.calibrate(k, v, gain=True, group=2).codec(300)
    c.save(tmp_path / "c.npz")
    back = kvc.Codec.load(tmp_path / "c.npz")
    assert back.digest == c.digest and back.gain and back.row_bytes == c.row_bytes
    assert np.array_equal(back.encode(k[:9], v[:9]), c.encode(k[:9], v[:9]))


# --- with the real decoder ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol():
    from engram.decoder.model import DecoderConfig, load

    return load(DecoderConfig(threads=2))


def _text_chunks(tok, t: int):
    from engram.evals.calibrate import chunks_of
    from engram.evals.haystack import PASSKEY_FILLER

    text = "Alice keeps the spare key under the blue flower pot by the door. " + PASSKEY_FILLER * 30
    return chunks_of(tok(text, add_special_tokens=False).input_ids, t, 8)


@pytest.mark.model
def test_codec_blocks_assemble_like_float_blocks(smol):
    """Blocks written through a generous codec give the reader the cache float16 blocks give it: keys before
    RoPE are placed token by token at their block's place (a wrong position would be far off)."""
    from engram.decoder import blocks as kv
    from engram.decoder.generate import MemoryDecoder
    from engram.decoder.layout import BlockLayout
    from engram.decoder.model import sink_token_id
    from engram.decoder.rope import layer_rotaries
    from engram.evals.calibrate import encode_float, tokens_of

    model, tok = smol
    t, sink = 32, sink_token_id(tok)
    chunks = _text_chunks(tok, t)[:16]
    float_batch = encode_float(model, sink, chunks, t, "float32")
    keys, values = tokens_of(float_batch, layer_rotaries(model))
    codec = kvc.calibrate(keys, values).codec(6 * keys[0].numel() * 2)
    layout = BlockLayout.of(model.config, t, 0, "codec", codec=codec)
    assert layout.kv_columns() == {"codes": ((t, codec.row_bytes), "uint8")}
    picked = [chunks[3], chunks[7], (chunks[9][0][:20], chunks[9][1])]  # the last one short
    coded = kv.blocks_of(
        kv.encode_chunks(model, sink, [c for c, _ in picked], layout, contexts=[x for _, x in picked], codec=codec)
    )
    plain = kv.blocks_of(
        kv.encode_chunks(
            model, sink, [c for c, _ in picked], BlockLayout.of(model.config, t, 0), contexts=[x for _, x in picked]
        )
    )
    got, _ = MemoryDecoder(model, tok, kv_dtype="codec", codec=codec).build_cache(coded, t)
    want, _ = MemoryDecoder(model, tok).build_cache(plain, t)
    assert got.get_seq_length() == want.get_seq_length() == 1 + 2 * t + 20
    for layer in (0, 14, 29):
        for a, b in (
            (got.layers[layer].keys, want.layers[layer].keys),
            (got.layers[layer].values, want.layers[layer].values),
        ):
            assert float((a - b).norm() / b.norm()) < 0.03


@pytest.mark.model
def test_shipped_codec_answers_the_passkey(smol):
    from engram.decoder import blocks as kv
    from engram.decoder.codec import load_codec
    from engram.decoder.generate import MemoryDecoder
    from engram.decoder.layout import BlockLayout
    from engram.decoder.model import sink_token_id
    from engram.evals.haystack import PASSKEY_FILLER, PASSKEY_QUESTION, passkey_needle

    model, tok = smol
    codec = load_codec("", "smollm2")
    codec.check_fits(model.config.num_hidden_layers, model.config.num_key_value_heads, 64)
    layout = BlockLayout.of(model.config, 128, 0, "codec", codec=codec)
    filler = tok(PASSKEY_FILLER * 20, add_special_tokens=False).input_ids
    needle = tok(" " + passkey_needle(52817), add_special_tokens=False).input_ids
    chunks = [filler[:128], (filler[:60] + needle + filler[60:])[:128]]
    blocks = kv.blocks_of(kv.encode_chunks(model, sink_token_id(tok), chunks, layout, codec=codec))
    answer = MemoryDecoder(model, tok, kv_dtype="codec", codec=codec).answer(PASSKEY_QUESTION, blocks, 128, 8)
    assert "52817" in answer.text


def test_codec_settings_are_checked(tmp_path):
    from engram.decoder.codec import codec_file
    from engram.decoder.layout import BlockLayout

    with pytest.raises(ValueError, match="no codec file"):
        codec_file(str(tmp_path / "missing.npz"), "smollm2")
    with pytest.raises(ValueError, match="calibrate"):
        codec_file("", "/some/local/model")

    class Config:
        num_hidden_layers, num_key_value_heads, num_attention_heads, hidden_size, head_dim = 2, 1, 1, 8, 8

    with pytest.raises(ValueError, match="needs a codec"):
        BlockLayout.of(Config(), 16, 0, "codec")
    k, v = _correlated(n=300, layers=2, heads=1, head_dim=8)
    with pytest.raises(ValueError, match="dense blocks"):
        BlockLayout.of(Config(), 16, 8, "codec", codec=kvc.calibrate(k, v).codec(40))
    with pytest.raises(ValueError, match="another decoder"):
        kvc.calibrate(k, v).codec(40).check_fits(30, 3, 64)
    kvc.calibrate(k, v).codec(40).save(tmp_path / "c.npz")
    written_with = kvc.load_codec(str(tmp_path / "c.npz"), "smollm2").digest
    assert kvc.load_codec(str(tmp_path / "c.npz"), "smollm2", written_with).digest == written_with
    with pytest.raises(ValueError, match="not the one this data was written with"):
        kvc.load_codec(str(tmp_path / "c.npz"), "smollm2", "0123456789abcdef")
