"""The real decoder: RoPE re-rotation is exact, blocks answer, local model folders load."""

import pytest
import torch
from engram.decoder import kv
from engram.decoder.model import DecoderConfig, load, model_path


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
            moved = kv.rerotate(at0.layers[layer].keys, delta, model.model.rotary_emb)
            torch.testing.assert_close(moved, atd.layers[layer].keys, atol=1e-3, rtol=1e-3)  # float32 trig


@pytest.mark.parametrize("kv_dtype", ["float16", "int8", "int4"])
def test_blocks_answer_a_passkey(smol, kv_dtype):
    model, tok = smol
    layout = kv.KVLayout.of(model, 64, 0, kv_dtype)
    dec = kv.MemoryDecoder(model, tok, kv_dtype=kv_dtype)
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


def test_local_model_folder(smol, tmp_path):
    """Any local Hugging Face causal-LM folder works as the decoder (here: the converted SmolLM2)."""
    cfg = DecoderConfig(model=str(model_path(DecoderConfig())))
    model, tok = load(cfg)
    assert model.config.num_hidden_layers == 30
    with pytest.raises(FileNotFoundError, match="config.json"):
        model_path(DecoderConfig(model=str(tmp_path)))
