"""Benchmark cases (BRIEF §5): passkey, NIAH and RULER needles planted in a haystack, and how answers score.

Contexts are written as documents of `segment` tokens. The haystack repeats with a period that is a whole number
of segments, so its segments are identical across cases and depths and the service's content de-duplication
encodes each distinct segment once; only the needle's segments are new in each case.
Lengths take k = 1,000 and M = 1,000,000 tokens.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field

from .haystack import (
    NIAH_NEEDLE,
    NIAH_QUESTION,
    PASSKEY_FILLER,
    PASSKEY_QUESTION,
    essays,
    first_integer,
    passkey_needle,
)

TASKS = ("passkey", "niah", "ruler")
RULER_VARIANTS = ("single", "multikey", "multivalue", "multiquery")
DEFAULT_LENGTHS = ("8k", "32k", "128k", "512k", "1M")


def parse_length(s: str) -> int:
    s = s.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(s[-1:], 1)
    return int(float(s[:-1] if scale > 1 else s) * scale)


@dataclass
class Needle:
    text: str  # inserted on a sentence boundary
    marker: str  # the needle's answer string (for reading the results)
    depth: float


@dataclass
class Case:
    task: str
    length: int
    depth: float
    trial: int
    question: str
    expected: list[str]  # strings the answer must contain (share found = score), or the passkey
    needles: list[Needle]
    results: dict = field(default_factory=dict)


# --- cases -------------------------------------------------------------------------------------------------------
def ruler_question(keys: list[str], variant: str) -> str:
    if variant == "multiquery":
        ks = ", ".join(keys[:-1]) + " and " + keys[-1]
        return (
            f"What are the special magic numbers for {ks} mentioned in the provided text? "
            f"The special magic numbers for {ks} mentioned in the provided text are"
        )
    if variant == "multivalue":
        return (
            f"What are all the special magic numbers for {keys[0]} mentioned in the provided text? "
            f"The special magic numbers for {keys[0]} mentioned in the provided text are"
        )
    return (
        f"What is the special magic number for {keys[0]} mentioned in the provided text? "
        f"The special magic number for {keys[0]} mentioned in the provided text is"
    )


def make_case(task: str, variant: str, length: int, depth: float, trial: int, rng: random.Random) -> Case:
    if task == "passkey":
        key = rng.randint(10_000, 99_999)
        return Case(
            task, length, depth, trial, PASSKEY_QUESTION, [str(key)], [Needle(passkey_needle(key), str(key), depth)]
        )
    if task == "niah":
        return Case(
            task,
            length,
            depth,
            trial,
            NIAH_QUESTION,
            ["sandwich", "dolores park"],
            [Needle(NIAH_NEEDLE + " ", "Dolores Park", depth)],
        )

    def magic(key: str, value: str, d: float) -> Needle:
        return Needle(f"One of the special magic numbers for {key} is: {value}. ", value, d)

    def value() -> str:
        return str(rng.randint(1_000_000, 9_999_999))

    keys = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(4)]
    others = [rng.random() for _ in range(3)]
    if variant == "single":
        v = value()
        needles, expected = [magic(keys[0], v, depth)], [v]
    elif variant == "multikey":  # the target and 3 distractors with other UUID keys
        vs = [value() for _ in range(4)]
        needles = [magic(keys[0], vs[0], depth)] + [magic(k, v, d) for k, v, d in zip(keys[1:], vs[1:], others)]
        expected = [vs[0]]
    elif variant == "multivalue":  # 4 values for one key, all required
        vs = [value() for _ in range(4)]
        needles = [magic(keys[0], v, d) for v, d in zip(vs, [depth, *others])]
        expected = vs
    else:  # multiquery: 4 keys asked at once
        vs = [value() for _ in range(4)]
        needles = [magic(k, v, d) for k, v, d in zip(keys, vs, [depth, *others])]
        expected = vs
    return Case(f"ruler-{variant}", length, depth, trial, ruler_question(keys, variant), expected, needles)


def score(case: Case, answer: str) -> float:
    if case.task == "passkey":
        return float(first_integer(answer) == int(case.expected[0]))
    a = answer.lower()
    if case.task == "niah":
        return float(all(e in a for e in case.expected))
    return sum(e in a for e in case.expected) / len(case.expected)


# --- contexts ----------------------------------------------------------------------------------------------------
class Haystack:
    """Segment texts of a periodic haystack; segment j of any length is the same text in every case."""

    def __init__(self, task: str, tokenizer, segment: int):
        self.tok, self.segment = tokenizer, segment
        if task == "passkey":
            per = len(tokenizer(PASSKEY_FILLER * 50, add_special_tokens=False).input_ids) / 50
            self.period = [PASSKEY_FILLER * max(1, round(segment / per))]
        else:
            ids = tokenizer(essays(), add_special_tokens=False).input_ids
            n = len(ids) // segment
            self.period = [tokenizer.decode(ids[i * segment : (i + 1) * segment]) for i in range(n)]
        self.period_ids = [tokenizer(t, add_special_tokens=False).input_ids for t in self.period]

    def documents(self, length: int, needles: list[Needle]) -> list[tuple[str, str]]:
        """Haystack segments of `length` tokens in all (the last one cut short), needles inserted."""
        texts, total, j = [], 0, 0
        while total < length:
            ids = self.period_ids[j % len(self.period)]
            if total + len(ids) <= length:
                texts.append(self.period[j % len(self.period)])
            else:  # the same cut in every case of this length, so it too is encoded once
                ids = ids[: length - total]
                texts.append(self.tok.decode(ids))
            total += len(ids)
            j += 1
        by_segment: dict[int, list[Needle]] = {}
        for n in needles:
            by_segment.setdefault(min(int(n.depth * len(texts)), len(texts) - 1), []).append(n)
        for j, ns in by_segment.items():
            text = texts[j]
            for n in sorted(ns, key=lambda n: -n.depth):  # deepest first: earlier offsets stay valid
                frac = n.depth * len(texts) - j
                at = int(min(max(frac, 0.0), 1.0) * len(text))
                end = text.rfind(". ", 0, at)
                at = 0 if end < 0 else end + 2
                text = text[:at] + n.text + text[at:]
            texts[j] = text
        return [(f"seg-{j:06d}", t) for j, t in enumerate(texts)]
