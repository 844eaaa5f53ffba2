"""The real decoder: RoPE re-rotation is exact, blocks answer, local model folders load."""

import pytest
import torch

from engram.decoder import blocks as kv
from engram.decoder.generate import MemoryDecoder, decode_one_token, generate, prefill
from engram.decoder.layout import BlockLayout
from engram.decoder.model import DecoderConfig, load, model_path, sink_token_id
from engram.decoder.rope import rerotate

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def smol():
    return load(DecoderConfig(threads=2))


@pytest.mark.parametrize("delta", [1, 128, 4000])
def test_rerotate_equals_encoding_at_the_offset(smol, delta):
    model, tok = smol
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog.").input_ids])
    n = ids.shape[1]
    with torch.inference_mode():
        at0 = model(input_ids=ids, use_cache=True).past_key_values
        atd = model(input_ids=ids, position_ids=torch.arange(delta, delta + n)[None], use_cache=True).past_key_values
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


def test_asks_decoded_together_answer_as_each_alone(smol):
    """Batched decoding (batch.generate_batch): asks over different numbers of blocks, with questions of different
    lengths and different answer limits, each get the answer they get alone — padding is masked, positions are
    each row's own."""
    model, tok = smol
    layout = BlockLayout.of(model.config, 64, 0, "int4")
    dec = MemoryDecoder(model, tok, kv_dtype="int4")
    ids = lambda text: tok(text, add_special_tokens=False).input_ids
    filler = ids("The grass is green. The sky is blue. " * 12)[:64]
    blocks = {}
    for key in (71432, 20581, 99013):
        needle = ids(f"The pass key is {key}. Remember it. {key} is the pass key.")
        blocks[key] = kv.blocks_of(kv.encode_chunks(model, dec.sink_id, [(filler[:20] + needle + filler)[:64]], layout))
    plain = kv.blocks_of(kv.encode_chunks(model, dec.sink_id, [filler], layout))
    asks = [
        ("What is the pass key? The pass key is", plain + blocks[71432], 64, 8),
        ("The pass key is", blocks[20581], 64, 7),
        (
            "Tell me: what is the pass key that you were told to remember? The pass key is",
            blocks[99013] + plain,
            64,
            12,
        ),
        ("What colour is the grass?", plain, 64, 3),
    ]
    alone = [dec.answer(q, b, t, n) for q, b, t, n in asks]
    got: dict[int, list] = {}
    for row, part in dec.answer_batch(asks, [lambda: False] * len(asks)):
        got.setdefault(row, []).append(part)
    for r, a in enumerate(alone):
        *pieces, answer = got[r]
        assert answer.text == a.text and answer.token_ids == a.token_ids, (r, answer.text, a.text)
        assert "".join(pieces) == a.text and answer.context_tokens == a.context_tokens
    assert "71432" in alone[0].text and "20581" in alone[1].text
    assert len(alone[3].token_ids) <= 3

    # Continuous batching: asks 1 and 3 join a batch already decoding asks 0 and 2, after its 2nd and 4th steps,
    # at most 3 rows at once; each still answers as alone, and admit is never offered more than the free rows.
    calls, offered = [0], []

    def admit(free):
        calls[0] += 1
        offered.append(free)
        ready = {2: [1], 4: [3]}.get(calls[0], [])
        return [(*asks[i], lambda: False) for i in ready][:free]

    got = {}
    for row, part in dec.answer_batch([asks[0], asks[2]], [lambda: False] * 2, admit, max_rows=3):
        got.setdefault(row, []).append(part)
    rows = {0: 0, 1: 2, 2: 1, 3: 3}  # row number -> ask: rows are numbered in the order given, then admitted
    assert sorted(got) == [0, 1, 2, 3]
    for row, i in rows.items():
        *pieces, answer = got[row]
        assert answer.token_ids == alone[i].token_ids, (i, answer.text, alone[i].text)
        assert "".join(pieces) == alone[i].text and answer.context_tokens == alone[i].context_tokens
    assert offered[:2] == [1, 1] and max(offered) <= 3  # 2 running of 3, then 3 running: nothing offered


def test_an_ask_arriving_mid_batch_joins_it_and_counts_its_wait(smol):
    """An ask that arrives while a batch decodes joins it between steps (continuous batching) instead of waiting
    for the whole batch; it once waited. Its reported time to first token covers its wait: from the call's start to
    its reply = time to first token + decode time."""
    import threading
    import time

    from engram.workers.decoder_worker import DecoderWorker

    worker = DecoderWorker(DecoderConfig(threads=2), "consecutive", "float16", max_batch=4)
    out, ended = {}, {}

    def ask(name, max_new):
        out[name] = worker.answer("Count: one, two, three,", 64, max_new, [])
        ended[name] = time.perf_counter()

    first = threading.Thread(target=ask, args=("long", 60))
    first.start()
    while not worker.batch_sizes():  # the first batch is under way
        time.sleep(0.005)
    time.sleep(0.3)
    ask("joined", 4)
    first.join()
    for d in out.values():
        assert abs(d.busy_s - (d.prefill_s + d.decode_s)) < 0.15, d
    assert ended["joined"] < ended["long"] and out["long"].new_tokens == 60
    assert out["joined"].prefill_s < out["long"].decode_s / 4  # it did not wait for the long answer
    assert worker.batch_sizes() == [2]  # one batch, the second ask joined it


def test_encoding_dtype_setting(monkeypatch):
    """ "auto" is bfloat16 exactly where it is native (CUDA, or a CPU with AVX512-BF16/AMX); explicit settings win;
    anything else is refused naming the setting."""
    from engram.decoder import model as dm

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
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


def test_held_rows_join_once_the_padding_costs_no_more_than_their_questions():
    from engram.decoder.batch import Row, worth_joining

    def rows(*lengths):
        return [Row(None, [1] * n, 0, 8, lambda: False) for n in lengths]

    assert not worth_joining(3, [])
    assert worth_joining(0, rows(20))  # an empty batch: at once
    assert worth_joining(1, rows(20))  # one running row padded to 20 tokens: 19 <= 20
    assert not worth_joining(16, rows(20))  # 16 rows padded: 304 wasted tokens for 20 real ones
    assert worth_joining(16, rows(*[20] * 16))  # 304 <= 320
    assert not worth_joining(2, rows(4, 1))  # 2 * 3 > 5


def test_batch_cache_writes_steps_in_place_and_matches_concatenation():
    """The batch's cache layer: a step within its room writes into the same buffer (no copy of the cache; copying
    it at every step cost more than the matmuls at 16 rows), growing past the room and keeping some rows and
    columns give what plain concatenation and indexing give."""
    from engram.decoder.batch import _buffers

    torch.manual_seed(0)
    a, b = torch.randn(1, 3, 5, 4), torch.randn(2, 3, 7, 4)
    cache = _buffers([[(a, a + 1)], [(b, b + 1)]], 7, 2)
    layer = cache.layers[0]
    plain = torch.cat([torch.cat([torch.zeros(1, 3, 2, 4), a], 2), b])  # a left-padded to 7
    torch.testing.assert_close(layer.keys, plain, atol=0, rtol=0)
    torch.testing.assert_close(
        layer.values,
        plain + torch.cat([torch.cat([torch.zeros(1, 3, 2, 4), torch.ones(1, 3, 5, 4)], 2), torch.ones(2, 3, 7, 4)]),
        atol=0,
        rtol=0,
    )
    buffer = layer.k_buf.data_ptr()
    for step in range(4):  # two steps within the room, then two past it
        new = torch.randn(3, 3, 1, 4)
        keys, values = cache.update(new, new * 2, 0)
        plain = torch.cat([plain, new], 2)
        torch.testing.assert_close(keys, plain, atol=0, rtol=0)
        torch.testing.assert_close(values[:, :, -1:], new * 2, atol=0, rtol=0)
        assert (layer.k_buf.data_ptr() == buffer) == (step < 2)
    assert cache.get_seq_length() == 11
    rows, cols = torch.tensor([0, 2]), torch.tensor([2, 3, 9, 10])
    layer.keep(rows, cols)
    torch.testing.assert_close(layer.keys, plain[rows][:, :, cols], atol=0, rtol=0)
    assert cache.get_seq_length() == 4


def test_retrieval_bias_reads_a_block_faintly_and_batches_as_alone(smol):
    """block_bias (ask.retrieval_bias): a bias of -1e9 on a block's tokens answers exactly as if that block were
    masked out by a plain 2D attention mask (the 4D mask's causal part and positions are right, in the prefill and
    every decode step); zeros are the plain reader; biased asks decoded together, joining mid-batch too, answer as
    each alone."""
    model, tok = smol
    layout = BlockLayout.of(model.config, 64, 0, "int4")
    dec = MemoryDecoder(model, tok, kv_dtype="int4")
    ids = lambda text: tok(text, add_special_tokens=False).input_ids
    filler = ids("The grass is green. The sky is blue. " * 12)[:64]
    a = kv.blocks_of(
        kv.encode_chunks(model, dec.sink_id, [(filler[:10] + ids("The pass key is 11235.") + filler)[:64]], layout)
    )
    b = kv.blocks_of(
        kv.encode_chunks(model, dec.sink_id, [(filler[:30] + ids("The pass key is 80417.") + filler)[:64]], layout)
    )
    question = "What is the pass key? The pass key is"
    prompt = dec._prompt(question)
    with torch.inference_mode():
        biased = dec.answer(question, a + b, 64, 8, block_bias=[-1e9, 0.0])
        cache, start = dec.build_cache(a + b, 64)
        mask = torch.ones(1, cache.get_seq_length() + len(prompt) + 8, dtype=torch.long)
        mask[0, 1 : 1 + 64] = 0  # block a's entries out, by HF's own 2D masking
        pos = torch.arange(start, start + len(prompt))[None]
        out = model(
            input_ids=torch.tensor([prompt]),
            past_key_values=cache,
            position_ids=pos,
            attention_mask=mask[:, : cache.get_seq_length() + len(prompt)],
            logits_to_keep=1,
        )
        want, token, at = [], out.logits[0, -1].argmax(), start + len(prompt)
        for _ in range(8):
            if int(token) == tok.eos_token_id:
                break
            want.append(int(token))
            n = cache.get_seq_length()
            out = model(
                input_ids=token.view(1, 1),
                past_key_values=cache,
                position_ids=torch.tensor([[at]]),
                attention_mask=mask[:, : n + 1],
            )
            token, at = out.logits[0, -1].argmax(), at + 1
    assert biased.token_ids == want and "80417" in biased.text, (biased.text, tok.decode(want))
    assert (
        dec.answer(question, a + b, 64, 8, block_bias=[0.0, 0.0]).token_ids
        == dec.answer(question, a + b, 64, 8).token_ids
    )

    asks = [
        (question, a + b, 64, 8, [-1e9, 0.0]),
        ("The pass key is", b + a, 64, 6, [-3.0, 0.0]),
        (question, a + b, 64, 8, None),
        ("Tell me what the pass key is. The pass key is", a + b, 64, 7, [0.0, -1e9]),
    ]
    alone = [dec.answer(q, bl, t, n, block_bias=bias) for q, bl, t, n, bias in asks]
    calls = [0]

    def admit(free):
        calls[0] += 1
        return [(*asks[3][:4], lambda: False, asks[3][4])] if calls[0] == 2 else []

    got: dict[int, object] = {}
    for row, part in dec.answer_batch(asks[:3], [lambda: False] * 3, admit, 4):
        if not isinstance(part, str):
            got[row] = part
    for r, want_answer in enumerate(alone):
        assert got[r].token_ids == want_answer.token_ids, (r, got[r].text, want_answer.text)
