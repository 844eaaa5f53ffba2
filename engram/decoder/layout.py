"""The shape of a stored block, derived once from the decoder's config; torch-free, so shards and the
coordinator use it without loading a model (vLLM-style: a frozen spec that knows its sizes in bytes).

Per block (L layers, H KV heads, S kept tokens, D head dim, T chunk tokens, R windows, C latent width):
  K/V columns        see `kv_columns` (quant.py writes and reads them)
  positions          [L, H, S] int16: the token's position in the chunk, 1..T; -1 = padding, sorted last
  tokens [T] int32, length, hash [16] uint8, latent [R, C] float32 (the store's own columns)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# stored K/V -> bits per element; "codec": the calibrated transform codec (codec.py), its bits set by the codec file
KV_DTYPES = {"float16": 16, "int8": 8, "int4": 4, "int2": 2, "codec": 0}
POSITION_SCHEMES = ("consecutive", "parallel")


def check_kv_dtype(kv_dtype: str) -> int:
    """-> bits per stored element."""
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"encoder.kv_dtype must be one of {', '.join(KV_DTYPES)}, not {kv_dtype!r}")
    return KV_DTYPES[kv_dtype]


def check_position_scheme(scheme: str) -> str:
    if scheme not in POSITION_SCHEMES:
        raise ValueError(f"ask.position_scheme must be 'consecutive' or 'parallel', not {scheme!r}")
    return scheme


def codes_per_byte(bits: int) -> int:
    """Integer codes are packed along the head dimension: 2 int4 or 4 int2 codes per byte (fp16, int8: 1)."""
    return max(1, 8 // bits)


@dataclass(frozen=True)
class BlockLayout:
    layers: int
    kv_heads: int
    keep_tokens: int  # S <= T; S == T means dense
    head_dim: int
    chunk_tokens: int  # T
    latent_dim: int = 384  # C (all-MiniLM-L6-v2)
    latents_per_chunk: int = 1  # R retrieval windows per chunk
    kv_dtype: str = "float16"  # float16, int8, int4 or int2 (quant.py), or codec (codec.py)
    codec: str = ""  # kv_dtype "codec": the codec's digest (blocks are read with the codec that wrote them)
    codec_bytes: int = 0  # kv_dtype "codec": bytes per token of a block's codes

    @classmethod
    def of(
        cls,
        model_config,
        chunk_tokens: int,
        keep_tokens: int = 0,
        kv_dtype: str = "float16",
        latent_dim: int = 384,
        latents_per_chunk: int = 1,
        context_tokens: int = 0,
        codec=None,
    ) -> BlockLayout:
        """From a Hugging Face model config; checks that [sink] + context + chunk fits the model's window."""
        c = model_config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        keep = chunk_tokens if keep_tokens <= 0 else min(keep_tokens, chunk_tokens)
        check_kv_dtype(kv_dtype)
        if (kv_dtype == "codec") != (codec is not None):
            raise ValueError("kv_dtype 'codec' needs a codec (codec.py), and a codec needs kv_dtype 'codec'")
        if codec is not None and keep < chunk_tokens:
            raise ValueError("encoder.kv_dtype 'codec' stores dense blocks: set encoder.keep_tokens = 0")
        room = getattr(c, "max_position_embeddings", 1 << 30) - 1 - chunk_tokens
        if not 0 <= context_tokens <= room:
            raise ValueError(f"encoder.context_tokens must be between 0 and {room}, not {context_tokens}")
        return cls(
            c.num_hidden_layers,
            c.num_key_value_heads,
            keep,
            head_dim,
            chunk_tokens,
            latent_dim,
            latents_per_chunk,
            kv_dtype,
            codec.digest if codec is not None else "",
            codec.row_bytes if codec is not None else 0,
        )

    @property
    def block_shape(self) -> tuple[int, int, int, int]:
        return (self.layers, self.kv_heads, self.keep_tokens, self.head_dim)

    def kv_columns(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """The K/V columns of one stored block: name -> (shape, dtype)."""
        lh = (self.layers, self.kv_heads)
        if self.kv_dtype == "codec":  # a token's codes, every layer, keys and values: one bit string (codec.py)
            return {"codes": ((self.keep_tokens, self.codec_bytes), "uint8")}
        kv = (*lh, self.keep_tokens, self.head_dim // codes_per_byte(check_kv_dtype(self.kv_dtype)))
        if self.kv_dtype == "float16":
            return {"keys": (kv, "float16"), "values": (kv, "float16")}
        per_channel, per_token = (*lh, self.head_dim), (*lh, self.keep_tokens)
        return {
            "keys": (kv, "uint8"),
            "values": (kv, "uint8"),
            "key_scale": (per_channel, "float16"),
            "key_zero": (per_channel, "float16"),
            "value_scale": (per_token, "float16"),
            "value_zero": (per_token, "float16"),
        }

    def read_columns(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """What a block is at read time: its K/V columns and positions."""
        return {**self.kv_columns(), "positions": ((self.layers, self.kv_heads, self.keep_tokens), "int16")}

    @property
    def block_columns(self) -> tuple[str, ...]:
        return tuple(self.read_columns())

    @property
    def dense(self) -> bool:
        return self.keep_tokens >= self.chunk_tokens

    def stored_columns(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """The read columns a store keeps: a dense block's positions are 1..length then -1, so they are derived
        from its length on read (`dense_positions`) instead of stored (23 KB per block, 3% of an int4 block)."""
        cols = self.read_columns()
        if self.dense:
            del cols["positions"]
        return cols

    def dense_positions(self, lengths: np.ndarray) -> np.ndarray:
        """[n] chunk lengths -> positions [n, L, H, T] int16 of dense blocks, as the encoder makes them."""
        at = np.arange(1, self.chunk_tokens + 1, dtype=np.int16)
        pos = np.where(at[None, :] <= np.asarray(lengths)[:, None], at, np.int16(-1)).astype(np.int16)
        return np.ascontiguousarray(
            np.broadcast_to(pos[:, None, None, :], (len(pos), self.layers, self.kv_heads, len(at)))
        )

    @property
    def block_bytes(self) -> int:
        """Bytes of one block's read-time columns (K/V codes, scales, positions)."""
        return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in self.read_columns().values())

    @property
    def full_fp16_bytes_per_token(self) -> int:
        """The decoder's own KV cache per token (keys and values, every layer, fp16): what blocks compete with."""
        return self.layers * 2 * self.kv_heads * self.head_dim * 2
