"""The decoder's batching and reading options, no service: asks decoded together answer as each alone (joining
mid-batch too), the batch's in-place cache, the joining rule, and the retrieval bias on the attention logits."""

import pytest
import torch

from engram.decoder import blocks as kv
from engram.decoder.generate import MemoryDecoder
from engram.decoder.layout import BlockLayout
from engram.decoder.model import DecoderConfig, load, with_cache


@pytest.fixture(scope="module")
def smol():
    return load(DecoderConfig(threads=2))


def int4_blocks(model, tok):
    """-> (a reader of int4 blocks, block(needle, at): a 64-token block of filler with the needle's text at token
    `at`, a block of filler alone)."""
    layout = BlockLayout.of(model.config, 64, 0, "int4")
    dec = MemoryDecoder(model, tok, kv_dtype="int4")
    ids = lambda text: tok(text, add_special_tokens=False).input_ids
    filler = ids("The grass is green. The sky is blue. " * 12)[:64]

    def block(needle: str, at: int) -> list:
        return kv.blocks_of(kv.encode_chunks(model, dec.sink_id, [(filler[:at] + ids(needle) + filler)[:64]], layout))

    return dec, block, kv.blocks_of(kv.encode_chunks(model, dec.sink_id, [filler], layout))


def test_asks_decoded_together_answer_as_each_alone(smol):
    """Batched decoding (batch.generate_batch): asks over different numbers of blocks, with questions of different
    lengths and different answer limits, each get the answer they get alone — padding is masked, positions are
    each row's own."""
    model, tok = smol
    dec, block, plain = int4_blocks(model, tok)
    blocks = {
        key: block(f"The pass key is {key}. Remember it. {key} is the pass key.", 20) for key in (71432, 20581, 99013)
    }
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
    # the long answer runs to its 60 tokens unless the batch's rounding meets an end-of-text token sooner (bf16
    # matmuls: what shares the batch, and from which step, moves its logits; CI once saw 54 under load)
    assert ended["joined"] < ended["long"] and out["long"].new_tokens > 10 * out["joined"].new_tokens
    assert out["joined"].prefill_s < out["long"].decode_s / 4  # it did not wait for the long answer
    assert worker.batch_sizes() == [2]  # one batch, the second ask joined it


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


def test_a_placed_row_is_written_into_the_batch_buffers_as_its_cache_would_be_copied():
    """A row's memory as a Placement (written straight into the batch's buffers, which start uninitialised) gives
    the batch cache that copying its assembled cache in gives, left padding zeros included, beside a row that
    was assembled already."""
    from engram.decoder.batch import Placement, _buffers

    torch.manual_seed(1)
    a, b = torch.randn(2, 1, 3, 5, 4), torch.randn(2, 1, 3, 7, 4)  # [L, 1, H, S, D]: two layers

    def write(keys, values):  # [L, 1, H, 5, D]
        keys[:], values[:] = a, -a

    for _ in range(3):  # fresh buffers each time: left over memory must never show through the padding
        placed = _buffers([[(x, -x) for x in b], Placement(5, write, a[:, :, :, :1])], 7, 3)
        copied = _buffers([[(x, -x) for x in b], [(x, -x) for x in a]], 7, 3)
        for got, want in zip(placed.layers, copied.layers):
            torch.testing.assert_close(got.keys, want.keys, atol=0, rtol=0)
            torch.testing.assert_close(got.values, want.values, atol=0, rtol=0)
            assert not got.keys[1, :, :2].any()  # the placed row's padding


def test_retrieval_bias_reads_a_block_faintly_and_batches_as_alone(smol):
    """block_bias (ask.retrieval_bias): a bias of -1e9 on a block's tokens answers exactly as if that block were
    masked out by a plain 2D attention mask (the 4D mask's causal part and positions are right, in the prefill and
    every decode step); zeros are the plain reader; biased asks decoded together, joining mid-batch too, answer as
    each alone."""
    model, tok = smol
    dec, block, _ = int4_blocks(model, tok)
    a, b = block("The pass key is 11235.", 10), block("The pass key is 80417.", 30)
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
            **with_cache(model, cache),
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
                **with_cache(model, cache),
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


@pytest.mark.parametrize("matmul_dtype, atol", [("float32", 1e-3), ("bfloat16", 1.0), ("int8", 4.0)])
def test_a_batched_row_computes_the_logits_it_computes_alone_up_to_rounding(matmul_dtype, atol, monkeypatch):
    """Each step's logits of a row beside others (longer memory, a longer question, a retrieval bias, a row that
    joins later) against the same row alone, both fed the same tokens: float32 to 1e-3 of a logit (measured 2e-5);
    with bf16 matmuls the batch's make-up moves a logit by up to ~0.5 (measured 0.1-0.5), so a greedy near-tie can
    flip (BENCHMARKS.md "Batched answers and rounding"). With int8 steps the pass a newcomer's question joins runs
    in float32 for every row (measured: a logit moves by up to 2.7 at that step, int8 against float32). A wrong
    mask, position or cache row is off by far more."""
    from engram.decoder import model as dm
    from engram.decoder.batch import Row, _Batch

    monkeypatch.setattr(dm, "cpu_has_int8", lambda: True)  # int8 steps even where they are slow (no VNNI)
    model, tok = load(DecoderConfig(threads=2, matmul_dtype=matmul_dtype))
    dec, block, plain = int4_blocks(model, tok)
    key = block("The pass key is 64290.", 20)
    logits = []
    model.register_forward_hook(lambda m, i, out: logits.append(out.logits[:, -1].float()))

    def row(question, blocks, bias=None):
        placed, start = dec.place(blocks, 64)
        return Row(placed, dec._prompt(question), start, 16, lambda: False, dec.memory_bias(blocks, bias))

    def run(rows, later, tokens):  # row 0 fed `tokens` (None: its own greedy ones); `later` joins after step 2
        logits.clear()
        batch = _Batch()
        with torch.inference_mode():
            batch.forward(model, rows, list(range(len(rows))))
            for step in range(8):
                if tokens is not None:
                    batch.token[0] = tokens[step]
                fed = int(batch.token[0])
                new = later if step == 2 else []
                batch.forward(model, new, list(range(len(batch.ids), len(batch.ids) + len(new))))
                yield fed

    mine = lambda: row("What is the pass key? The pass key is", plain + key)
    fed = list(run([mine()], [], None))
    alone = [x[0] for x in logits]
    others = [row("Tell me: what is the pass key that you were told to remember? The pass key is", key + plain + plain)]
    list(run([mine(), *others], [row("The pass key is", key, [-2.0])], fed))
    together = [x[0] for x in logits]
    assert len(together) == len(alone) == 9
    for step, (a, b) in enumerate(zip(alone, together)):
        torch.testing.assert_close(b, a, atol=atol, rtol=0, msg=f"step {step}")
    assert "64290" in tok.decode(fed)


def test_no_deprecated_cache_keyword(smol):
    """transformers 5.2x renamed the forward's `past_key_values` to `cache` and warns (FutureWarning) at the first
    call of each process — once per actor, into the demo's terminal. Encoding, one ask and a batch use the name
    the installed version takes (model.with_cache)."""
    import warnings

    model, tok = smol
    layout = BlockLayout.of(model.config, 64, 0, "int4")
    dec = MemoryDecoder(model, tok, kv_dtype="int4")
    chunk = tok("The pass key is 31415. Remember it.", add_special_tokens=False).input_ids
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        blocks = kv.blocks_of(kv.encode_chunks(model, dec.sink_id, [chunk], layout))
        dec.answer("The pass key is", blocks, 64, 2)
        asks = [("The pass key is", blocks, 64, 2), ("What is the pass key?", blocks, 64, 2)]
        answered = {row for row, part in dec.answer_batch(asks, [lambda: False] * 2) if not isinstance(part, str)}
    assert answered == {0, 1}


def test_the_batching_worker_loads_its_model_apart_from_its_batch_thread(monkeypatch):
    """The model is loaded in the constructor's thread, not in the batch thread that decodes (tried: one thread for
    every torch op makes libgomp's workers spin between parallel regions; 1.5x faster on idle cores, but under
    `engram load` on 2 shared cores they starved the shards and encoders, 5.1-5.2 vs 6.3-6.5 asks/s; BENCHMARKS.md
    "Batched answers under load")."""
    import threading

    from engram.workers import decoder_worker

    threads: dict[str, int] = {}
    load = decoder_worker.decoder_model.load

    def loading(cfg):
        threads["load"] = threading.get_ident()
        return load(cfg)

    class Watched(decoder_worker.MemoryDecoder):
        def answer_batch(self, *args, **kwargs):
            threads["batch"] = threading.get_ident()
            yield from super().answer_batch(*args, **kwargs)

    monkeypatch.setattr(decoder_worker.decoder_model, "load", loading)
    monkeypatch.setattr(decoder_worker, "MemoryDecoder", Watched)
    worker = decoder_worker.DecoderWorker(DecoderConfig(threads=2), "consecutive", "float16", max_batch=4)
    assert worker.answer("Count: one, two, three,", 64, 3, []).text
    assert threads["load"] == threading.get_ident() != threads["batch"], threads
