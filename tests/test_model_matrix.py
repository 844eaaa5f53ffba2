"""Block assembly across the architecture families users run, on tiny random-weight models (no download): keys
moved by re-rotation equal keys encoded at the target position, layer by layer (Gemma-3's sliding and global
layers have different RoPE bases; Phi-3's rotary may be partial), and a block read from the store answers as
plain contiguous prefill does (shared sink, the cache, sliding-window masks, quantised K/V within tolerance)."""

import numpy as np
import pytest
import torch
import transformers

from engram.decoder import blocks as kv
from engram.decoder.generate import MemoryDecoder, prefill
from engram.decoder.layout import BlockLayout
from engram.decoder.model import returned_cache
from engram.decoder.rope import check_supported, layer_rotaries, rerotate

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
ARCHS = {  # family -> (config class, model class, its own settings)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"num_hidden_layers": 2}),
    "llama-yarn": (  # YaRN scales cos and sin: re-rotation must stay a pure rotation
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "num_hidden_layers": 2,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 1024,
            },
        },
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_hidden_layers": 2}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"num_hidden_layers": 2, "head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"num_hidden_layers": 2, "sliding_window": None}),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", {"num_hidden_layers": 2, "sliding_window": 16}),
    "gemma3": (  # a 16-token window, so the 24-token block and the question cross it
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "num_hidden_layers": 3,
            "head_dim": 16,
            "sliding_window": 16,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        },
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"num_hidden_layers": 2}),
    "phi3-partial": (
        "Phi3Config",
        "Phi3ForCausalLM",
        {
            "num_hidden_layers": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        },
    ),
}
T = 24  # chunk tokens


class Tok:
    """What MemoryDecoder needs of a tokenizer: ids of the question template, the sink, decoding."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=False):
        return type("Enc", (), {"input_ids": [3 + (ord(ch) % 120) for ch in text]})()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


def tiny(arch: str):
    conf_cls, model_cls, own = ARCHS[arch]
    torch.manual_seed(0)
    config = getattr(transformers, conf_cls)(**{**COMMON, **own})
    model = getattr(transformers, model_cls)(config).eval()
    check_supported(model.config)
    return model


@pytest.mark.parametrize("arch", list(ARCHS))
def test_rerotated_keys_equal_keys_encoded_there(arch):
    model = tiny(arch)
    ids = torch.randint(3, 120, (1, 12))
    rotaries = layer_rotaries(model)
    for delta in (1, 37, 500):
        with torch.inference_mode():
            at0 = returned_cache(model(input_ids=ids, use_cache=True))
            at = model(input_ids=ids, position_ids=torch.arange(delta, delta + 12)[None], use_cache=True)
        for layer in range(model.config.num_hidden_layers):
            moved = rerotate(at0.layers[layer].keys, delta, rotaries[layer])
            torch.testing.assert_close(moved, returned_cache(at).layers[layer].keys, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("kv_dtype,atol", [("float16", 2e-3), ("int8", 5e-2)])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_a_stored_block_answers_as_contiguous_prefill(arch, kv_dtype, atol):
    model = tiny(arch)
    layout = BlockLayout.of(model.config, T, 0, kv_dtype)
    chunk = torch.randint(3, 120, (T,)).tolist()
    block = kv.blocks_of(kv.encode_chunks(model, 1, [chunk], layout, scorer="key_norm"))
    dec = MemoryDecoder(model, Tok(), "{question}", kv_dtype=kv_dtype)
    question = dec._prompt("where?")
    with torch.inference_mode():
        cache, start = dec.build_cache(block, T)
        assembled = prefill(model, cache, torch.tensor([question]), start)
        contiguous = model(input_ids=torch.tensor([[1, *chunk, *question]])).logits[:, -1]
    torch.testing.assert_close(assembled, contiguous, atol=atol, rtol=0)
    assert int(assembled.argmax()) == int(contiguous.argmax())


def test_unsupported_architectures_are_refused_with_a_reason():
    gpt2 = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2)
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        check_supported(gpt2)
    dynamic = transformers.LlamaConfig(
        **COMMON, num_hidden_layers=1, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}
    )
    with pytest.raises(ValueError, match="depends on the sequence length"):
        check_supported(dynamic)
    assert np.all([check_supported(tiny(a).config) is None for a in ("llama", "gemma3")])
