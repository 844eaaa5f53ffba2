"""The real decoder: RoPE re-rotation is exact, blocks answer, local model folders load."""

import pytest
import torch

from engram.decoder import blocks as kv
from engram.decoder.generate import MemoryDecoder, decode_one_token, generate, prefill
from engram.decoder.layout import BlockLayout
from engram.decoder.model import DecoderConfig, encoding_autocast, load, model_path, returned_cache, sink_token_id
from engram.decoder.rope import rerotate

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def smol():
    return load(DecoderConfig(threads=2, matmul_dtype="float32"))


@pytest.mark.parametrize("delta", [1, 128, 4000])
def test_rerotate_equals_encoding_at_the_offset(smol, delta):
    model, tok = smol
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog.").input_ids])
    n = ids.shape[1]
    with torch.inference_mode():
        at0 = returned_cache(model(input_ids=ids, use_cache=True))
        atd = returned_cache(model(input_ids=ids, position_ids=torch.arange(delta, delta + n)[None], use_cache=True))
        for layer in (0, 15, 29):
            moved = rerotate(at0.layers[layer].keys, delta, model.model.rotary_emb)
            torch.testing.assert_close(moved, atd.layers[layer].keys, atol=1e-3, rtol=1e-3)  # float32 trig


def test_context_is_encoded_but_not_stored(smol):
    """A chunk encoded after a context: layer 0 (which sees no other token) matches the chunk alone exactly once
    keys are rotated back to 1..T; later layers carry the context; a batch mixing context lengths and a short
    chunk gives the same rows as encoding each alone."""
    model, tok = smol
    ids = tok(
        "Alice keeps the spare key under the blue flower pot by the door. " * 3, add_special_tokens=False
    ).input_ids
    layout = BlockLayout.of(model.config, 16, 0)
    sink = sink_token_id(tok)
    chunks, contexts = [ids[16:32], ids[32:44], ids[0:16]], [ids[6:16], ids[16:32], []]
    alone = kv.encode_chunks(model, sink, chunks[:1], layout)
    batch = kv.encode_chunks(model, sink, chunks, layout, contexts=contexts)
    for name in ("keys", "values"):
        torch.testing.assert_close(
            torch.from_numpy(batch[name][0, 0]), torch.from_numpy(alone[name][0, 0]), atol=2e-3, rtol=2e-3
        )
        assert (batch[name][0, 10] != alone[name][0, 10]).any()  # layer 10 has seen the context
    for i, (c, x) in enumerate(zip(chunks, contexts)):
        one = kv.encode_chunks(model, sink, [c], layout, contexts=[x])
        for name, col in one.items():
            torch.testing.assert_close(
                torch.from_numpy(batch[name][i]).float(), torch.from_numpy(col[0]).float(), atol=2e-3, rtol=2e-3
            )
    assert batch["positions"][1, 0, 0].tolist() == [*range(1, 1 + len(chunks[1])), *[-1] * (16 - len(chunks[1]))]
    assert len(chunks[1]) < 16


@pytest.mark.parametrize("scorer", ["attention", "key_norm"])
def test_a_short_chunk_encodes_alike_alone_and_beside_a_full_one(smol, scorer):
    """Rows are padded to the batch's longest, not to a full chunk: a short chunk encoded alone (its own width)
    gives the block it gets in a batch padded to a full chunk, sparse (tokens picked by score) too."""
    model, tok = smol
    ids = tok("Bob parks the red van behind the bakery on Elm Street. " * 4, add_special_tokens=False).input_ids
    layout = BlockLayout.of(model.config, 32, 8, "float16")
    sink = sink_token_id(tok)
    short, full = ids[:11], ids[11:43]
    alone = kv.encode_chunks(model, sink, [short], layout, scorer=scorer)
    batch = kv.encode_chunks(model, sink, [short, full], layout, scorer=scorer)
    assert alone["positions"].tolist() == batch["positions"][:1].tolist()
    assert (alone["positions"] >= 0).sum(-1).max() == 8 and alone["positions"].max() <= len(short)
    for name, col in alone.items():
        torch.testing.assert_close(
            torch.from_numpy(col).float(), torch.from_numpy(batch[name][:1]).float(), atol=2e-3, rtol=2e-3
        )


@pytest.mark.parametrize("kv_dtype", ["float16", "int8", "int4"])
def test_blocks_answer_a_passkey(smol, kv_dtype):
    model, tok = smol
    layout = BlockLayout.of(model.config, 64, 0, kv_dtype)
    dec = MemoryDecoder(model, tok, kv_dtype=kv_dtype)
    filler = tok("The grass is green. The sky is blue. " * 12, add_special_tokens=False).input_ids[:64]
    needle = tok("The pass key is 71432. Remember it. 71432 is the pass key.", add_special_tokens=False).input_ids
    chunks = [filler, (filler[:20] + needle + filler)[:64], filler[3:] + filler[:3]]
    batch = kv.encode_chunks(model, dec.sink_id, chunks, layout)
    k = batch["keys"]
    d = layout.head_dim // 2 if kv_dtype == "int4" else layout.head_dim
    assert k.shape == (3, layout.layers, layout.kv_heads, 64, d)
    assert k.dtype.name == ("float16" if kv_dtype == "float16" else "uint8")
    a = dec.answer("What is the pass key? The pass key is", kv.blocks_of(batch), 64, 8)
    assert a.text.split(".")[0].strip() == "71432"
    assert a.context_tokens == 1 + 3 * 64


def test_decode_one_token_equals_a_full_forward(smol):
    """One decode step on the cache gives the token a plain forward over the whole sequence gives."""
    from transformers import DynamicCache

    model, tok = smol
    ids = tok("The capital of France is Paris. The capital of Italy is", add_special_tokens=False).input_ids
    with torch.inference_mode():
        cache = DynamicCache()
        first = prefill(model, cache, torch.tensor([ids]), 0).argmax(-1)
        second = decode_one_token(model, cache, first, len(ids))
        full = model(input_ids=torch.tensor([[*ids, int(first)]])).logits[0, -1].argmax()
    assert int(second) == int(full)


def test_generation_stops_when_its_caller_gives_up(smol):
    """`stop()` is asked before each step: a cancelled ask stops spending the decoder (the Ray actor's stop is
    ray's cancellation flag); the tokens made until then are a prefix of the full answer."""
    from transformers import DynamicCache

    model, tok = smol
    prompt = tok("Count: one, two, three,", add_special_tokens=False).input_ids
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) >= 3

    with torch.inference_mode():
        full = generate(model, DynamicCache(), prompt, 0, 12, None).ids
        stopped = generate(model, DynamicCache(), prompt, 0, 12, None, stop).ids
    assert len(full) == 12 and len(stopped) == 3 and stopped == full[:3]


def test_local_model_folder(smol, tmp_path):
    """Any local Hugging Face causal-LM folder works as the decoder (here: the converted SmolLM2)."""
    cfg = DecoderConfig(model=str(model_path(DecoderConfig())))
    model, _ = load(cfg)
    assert model.config.num_hidden_layers == 30
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        model_path(DecoderConfig(model=str(tmp_path)))


def test_encoding_dtype_setting(monkeypatch):
    """ "auto" is bfloat16 exactly where it is native (CUDA, or a CPU with AVX512-BF16/AMX); explicit settings win;
    anything else is refused naming the setting."""
    from engram.decoder import model as dm

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(dm, "cpu_has_int8", lambda: True)
    for native in (True, False):
        monkeypatch.setattr(dm, "cpu_has_bf16", lambda native=native: native)
        assert dm.encoding_dtype("auto", cpu) == (torch.bfloat16 if native else torch.float32)
        assert dm.encoding_dtype("auto", cuda) == torch.bfloat16
        assert dm.encoding_dtype("float32", cpu) == torch.float32
    with pytest.raises(ValueError, match=r"encoder\.dtype"):
        dm.encoding_dtype("float8", cpu)


def test_bfloat16_encoding_stays_within_int4_rounding(smol):
    """Blocks encoded under bfloat16 autocast (encoder.dtype) differ from float32 ones by far less than int4 storage
    already rounds away: bf16's K/V within 1% (keys) and 2% (values) of float32's, int4's own rounding 3x that or
    more, and the int4 blocks of both equally far from float32's unquantised K/V (measured 5.3% keys, 9.6% values)."""
    from engram.decoder import quant
    from engram.decoder.model import encoding_autocast

    model, tok = smol
    ids = tok("The harbour master logs every ship that enters the bay. " * 12, add_special_tokens=False).input_ids
    chunks, contexts = [ids[32:160], ids[192:320]], [ids[:32], ids[160:192]]
    sink = sink_token_id(tok)

    def encode(kv_dtype, setting):
        with encoding_autocast(setting, model):
            out = kv.encode_chunks(
                model, sink, chunks, BlockLayout.of(model.config, 128, kv_dtype=kv_dtype), contexts=contexts
            )
        if kv_dtype == "float16":
            return [torch.from_numpy(out[c]).float() for c in ("keys", "values")]
        return [x.float() for x in quant.unpack_kv({c: torch.from_numpy(x) for c, x in out.items()}, "int4")]

    def error(got, want):
        return [float((a - b).norm() / b.norm()) for a, b in zip(got, want)]

    exact = encode("float16", "float32")
    bf16_raw, fp32_int4, bf16_int4 = (
        error(encode("float16", "bfloat16"), exact),
        error(encode("int4", "float32"), exact),
        error(encode("int4", "bfloat16"), exact),
    )
    assert bf16_raw[0] < 0.01 and bf16_raw[1] < 0.02, bf16_raw
    for ours, base, raw in zip(bf16_int4, fp32_int4, bf16_raw):
        assert base > 3 * raw and ours < 1.1 * base, (bf16_raw, fp32_int4, bf16_int4)


def test_block_key_scale_scales_the_memory_logits_only(smol):
    """block_key_scale = s multiplies the blocks' keys (the question's attention logits to memory tokens) and
    nothing else: the sink's keys and every value are the plain cache's; s = 1 is the plain cache exactly."""
    model, tok = smol
    layout = BlockLayout.of(model.config, 32, 0, "int4")
    ids = tok("The pass key is 71432. Remember it. The grass is green. " * 4, add_special_tokens=False).input_ids
    blocks = kv.blocks_of(kv.encode_chunks(model, sink_token_id(tok), [ids[:32], ids[32:64]], layout))
    plain, _ = MemoryDecoder(model, tok, kv_dtype="int4").build_cache(blocks, 32)
    scaled, _ = MemoryDecoder(model, tok, kv_dtype="int4", block_key_scale=1.3).build_cache(blocks, 32)
    same, _ = MemoryDecoder(model, tok, kv_dtype="int4", block_key_scale=1.0).build_cache(blocks, 32)
    for layer in (0, 29):
        p, s = plain.layers[layer], scaled.layers[layer]
        torch.testing.assert_close(s.keys[:, :, :1], p.keys[:, :, :1], atol=0, rtol=0)  # the sink
        torch.testing.assert_close(s.keys[:, :, 1:], 1.3 * p.keys[:, :, 1:], atol=1e-2, rtol=1e-2)  # bf16/fp32 keys
        torch.testing.assert_close(s.values, p.values, atol=0, rtol=0)
        torch.testing.assert_close(same.layers[layer].keys, p.keys, atol=0, rtol=0)
    with pytest.raises(ValueError, match="block_key_scale"):
        MemoryDecoder(model, tok, block_key_scale=0.0)


def test_matmul_dtype_setting(monkeypatch):
    """decoder.matmul_dtype: "auto" holds Linear weights in bf16 exactly where bf16 is native on a CPU; explicit
    settings win; a model already in bf16 (CUDA's default) is left alone; anything else is refused by name."""
    from engram.decoder import model as dm

    monkeypatch.setattr(dm, "cpu_has_int8", lambda: True)
    for native in (True, False):
        monkeypatch.setattr(dm, "cpu_has_bf16", lambda native=native: native)
        assert DecoderConfig(device="cpu").bf16_matmuls() is native
        assert DecoderConfig(device="cpu", matmul_dtype="bfloat16").bf16_matmuls()
        assert not DecoderConfig(device="cpu", matmul_dtype="float32").bf16_matmuls()
        assert not DecoderConfig(device="cpu", dtype="bfloat16", matmul_dtype="bfloat16").bf16_matmuls()
        assert DecoderConfig(device="cpu").linear_dtype() == ("bfloat16" if native else "float32")
        assert DecoderConfig(device="cpu", matmul_dtype="int8").linear_dtype() == "int8"
        assert DecoderConfig(device="cpu", dtype="bfloat16", matmul_dtype="int8").linear_dtype() == "float32"
        assert DecoderConfig(device="cuda", dtype="float32", matmul_dtype="int8").linear_dtype() == "float32"
    with pytest.raises(ValueError, match=r"decoder\.matmul_dtype"):
        DecoderConfig(matmul_dtype="float16")


def test_int8_matmuls_only_where_the_cpu_has_int8_dot_products(monkeypatch):
    """decoder.matmul_dtype = "int8" on a CPU without AVX512-VNNI or AMX: torch._int_mm is a plain loop there
    (measured on an AVX2 EPYC: a 16-row step's Linear ~30x slower than float32), so the reader stays float32 and
    says so at load; with them, int8 (found on an AVX2 machine where "int8" made every step ~30x slower)."""
    from engram.decoder import model as dm

    monkeypatch.setattr(dm, "cpu_has_int8", lambda: False)
    assert DecoderConfig(device="cpu", matmul_dtype="int8").linear_dtype() == "float32"
    with pytest.warns(UserWarning, match="AVX512-VNNI"):
        reader, _ = load(DecoderConfig(threads=1, matmul_dtype="int8"))
    assert not any(isinstance(m, dm.Int8Linear) for m in reader.modules())
    monkeypatch.setattr(dm, "cpu_has_int8", lambda: True)
    assert DecoderConfig(device="cpu", matmul_dtype="int8").linear_dtype() == "int8"


def _int8_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What an Int8Linear should compute: weights rounded per output channel and each input row per row to
    integers in [-127, 127] (absmax / 127, in float32 as the module rounds), multiplied and scaled back in float64."""
    x, w = x.reshape(-1, x.shape[-1]).float(), w.float()
    ws = w.abs().amax(1) / 127
    xs = x.abs().amax(1, keepdim=True) / 127
    xq, wq = torch.round(x / xs).double(), torch.round(w / ws[:, None]).double()
    return ((xq @ wq.T) * xs.double() * ws.double()).float()


@pytest.mark.parametrize("rows, features", [((1,), (576, 576)), ((3, 1), (576, 1536)), ((16, 1), (1536, 576))])
def test_int8_linear_steps_compute_the_rounded_product_and_each_row_alone(rows, features):
    """An Int8Linear's decoding step (one token per row) against the float64 reference of the same rounding (to
    float32 rounding of the scales), and each row's output bit for bit the same whatever rows share its call: a
    row's scale is its own. Near the float product: 8 bits' rounding, not a wrong layout or scale."""
    from engram.decoder.model import Int8Linear

    torch.manual_seed(0)
    plain = torch.nn.Linear(*features, bias=False)
    q = Int8Linear(plain)
    x = torch.randn(*rows, features[0]) * torch.rand(*rows, 1) * 10  # rows of different ranges
    with torch.inference_mode():
        got, want = q(x), plain(x)
        first = q(x.reshape(-1, features[0])[:1])
    assert got.shape == (*rows, features[1]) and got.dtype == torch.float32
    torch.testing.assert_close(got.reshape(-1, features[1]), _int8_reference(x, plain.weight), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(first[0], got.reshape(-1, features[1])[0], atol=0, rtol=0)
    assert 0 < (got - want).abs().max() < 0.05 * want.abs().max()


def test_int8_linear_reads_questions_in_float32():
    """Several tokens per row (a pass that reads a question): the float32 product, bit for bit."""
    from engram.decoder.model import Int8Linear

    torch.manual_seed(0)
    plain = torch.nn.Linear(576, 192)
    x = torch.randn(4, 7, 576)
    with torch.inference_mode():
        torch.testing.assert_close(Int8Linear(plain)(x), plain(x), atol=0, rtol=0)


def test_int8_reader_reads_as_float32_and_steps_to_the_same_token(smol):
    """A whole model of Int8Linear (decoder.matmul_dtype = "int8"): a prompt's pass gives the float32 logits bit
    for bit; a decoding step after it moves them by 8 bits' rounding and picks the same next token. The output
    head shares the embedding's float32 weight (no second float copy)."""
    import copy

    from engram.decoder.model import Int8Linear, replace_linears, returned_cache, with_cache

    model, tok = smol
    fast = copy.deepcopy(model)
    assert replace_linears(fast, Int8Linear) == 7 * model.config.num_hidden_layers + 1
    assert fast.lm_head.weight is fast.model.embed_tokens.weight
    ids = torch.tensor([tok("The pass key is 4242. Remember it. The pass key is").input_ids])
    with torch.inference_mode():
        exact, read = model(input_ids=ids).logits, fast(input_ids=ids).logits
        torch.testing.assert_close(read, exact, atol=0, rtol=0)
        step = ids[:, -1:]
        prefix = ids[:, :-1]
        cache = returned_cache(model(input_ids=prefix, use_cache=True))
        want = model(input_ids=step, **with_cache(model, copy.deepcopy(cache))).logits
        got = fast(input_ids=step, **with_cache(fast, cache)).logits
    assert 0 < (got - want).abs().mean() < 1.0
    assert got[0, -1].argmax() == want[0, -1].argmax()


@pytest.mark.parametrize("matmul_dtype", ["bfloat16", "int8"])
def test_encoder_never_uses_the_readers_fast_matmuls(matmul_dtype, monkeypatch):
    """Stored blocks never depend on how the reader multiplies: the encoder loads float32 Linears whatever
    decoder.matmul_dtype says (its own dtype is encoder.dtype)."""
    from engram.decoder import model as dm
    from engram.decoder.model import Bf16Linear, Int8Linear
    from engram.workers.encoder import Encoder, EncoderConfig

    monkeypatch.setattr(dm, "cpu_has_int8", lambda: True)  # the int8 reader even on a CPU without VNNI
    kind = {"bfloat16": Bf16Linear, "int8": Int8Linear}[matmul_dtype]
    dec = DecoderConfig(threads=1, matmul_dtype=matmul_dtype)
    reader, _ = load(dec)
    assert any(isinstance(m, kind) for m in reader.modules())
    enc = Encoder(EncoderConfig(), dec, BlockLayout.of(reader.config, 128, 0, "int4"))
    assert not any(isinstance(m, (Bf16Linear, Int8Linear)) for m in enc.model.modules())


@pytest.mark.parametrize("kv_dtype", ["int4", "float16"])
def test_a_fixed_shape_pass_makes_a_block_the_same_whatever_it_was_encoded_beside(smol, kv_dtype):
    """encoder.fixed_shape: every pass batch_chunks rows x the full width, so a chunk's block is bit for bit the
    same alone, in a full batch and beside a short chunk (with the bf16 pass these differ in ~5% of int4 codes
    when each pass is cut to its own rows and longest row: the shape picks the kernels' rounding)."""
    model, tok = smol
    text = " ".join(f"Note {i}: the {w} valve on deck {i % 7} was checked." for i, w in enumerate(["red", "tall"] * 20))
    ids = tok(text, add_special_tokens=False).input_ids
    layout = BlockLayout.of(model.config, 128, 0, kv_dtype)
    sink = sink_token_id(tok)
    chunks = [ids[i * 128 : (i + 1) * 128] for i in range(4)]
    ctx = [ids[max(0, i * 128 - 32) : i * 128] for i in range(4)]

    def encode(picked, rows=4, width=1 + 32 + 128):
        with encoding_autocast("bfloat16", model), torch.inference_mode():
            cs, xs = [chunks[i] if i >= 0 else chunks[2][:40] for i in picked], [ctx[max(i, 0)] for i in picked]
            return kv.encode_chunks(model, sink, cs, layout, contexts=xs, rows=rows, width=width)

    alone, full, beside_short = encode([1]), encode([0, 1, 2, 3]), encode([1, -1])
    for name, col in alone.items():
        assert (col[0] == full[name][1]).all() and (col[0] == beside_short[name][0]).all(), name
