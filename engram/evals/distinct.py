"""A haystack of real text that never repeats, and facts of several kinds planted in it (issue #13).

The text: docstrings of the packages the project installs (transformers, torch, ray, zarr, numpy, ...), read with
`ast` from their source files (nothing is imported), in a fixed order, each distinct docstring once. Any machine
with the project installed builds the same haystack.

The facts, each in its own document:
  uuid-key         RULER multi-key: "One of the special magic uuids for <uuid> is: <uuid>." (asked)
  uuid-distractor  the same form with other keys (never asked: they make the asked keys hard to tell apart)
  identifier       exact codes: a hex checksum or a part number, told apart from look-alikes only by the code
  boundary         a plain fact placed so that a chunk boundary cuts it: the subject ends one chunk, the answer
                   opens the next
  paraphrase       a fact asked in other words than it is written in
"""

from __future__ import annotations

import ast
import importlib.util
import random
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("transformers", "torch", "ray", "zarr", "numpy", "grpc", "google.protobuf", "sentence_transformers")
KINDS = ("uuid-key", "identifier", "boundary", "paraphrase")


@dataclass
class Fact:
    kind: str
    text: str  # the sentence planted
    question: str = ""  # "" for distractors
    answer: str = ""  # the string a right answer contains (case-insensitive)
    document: str = ""  # where it was planted
    results: dict = field(default_factory=dict)

    @property
    def expected(self) -> str:
        """What a right answer contains (case-insensitive): the answer, or for a UUID its first three groups (18
        characters, unique among the planted UUIDs; a whole UUID is ~25 tokens, past a short answer's budget)."""
        return self.answer[:18] if self.kind == "uuid-key" else self.answer


def right(fact_kind: str, answer: str, said: str) -> float:
    return float(Fact(fact_kind, "", answer=answer).expected.lower() in said.lower())


def docstrings(packages: tuple[str, ...] = PACKAGES, min_chars: int = 300):
    """The docstrings (dedented) of the packages' modules, classes and functions, without any paragraph of over 80
    characters seen before (docstrings copy argument sections from one another); those still min_chars long."""
    seen: set[str] = set()
    for pkg in packages:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            continue
        for root in spec.submodule_search_locations:
            for path in sorted(Path(root).rglob("*.py")):
                try:
                    tree = ast.parse(path.read_text(encoding="utf-8"))
                except (SyntaxError, UnicodeDecodeError, ValueError):
                    continue
                for node in ast.walk(tree):
                    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                        doc = ast.get_docstring(node) or ""
                        kept = [p for p in doc.split("\n\n") if len(p) <= 80 or p not in seen]
                        seen.update(p for p in kept if len(p) > 80)
                        doc = "\n\n".join(kept)
                        if len(doc) >= min_chars:
                            yield doc


def corpus(tokens: int, tokenizer, doc_tokens: int = 4096) -> list[tuple[str, str]]:
    """Documents of about doc_tokens tokens, `tokens` in all, none repeating any text of another."""
    docs: list[tuple[str, str]] = []
    parts: list[str] = []
    have = total = 0
    for doc in docstrings():
        n = len(tokenizer(doc, add_special_tokens=False).input_ids)
        parts.append(doc)
        have += n
        if have >= doc_tokens:
            docs.append((f"doc-{len(docs):05d}", "\n\n".join(parts)))
            total += have
            parts, have = [], 0
            if total >= tokens:
                return docs
    if parts:
        docs.append((f"doc-{len(docs):05d}", "\n\n".join(parts)))
        total += have
    if total < tokens:
        raise ValueError(f"the installed packages' docstrings hold {total} tokens, fewer than {tokens}")
    return docs


# --- facts -------------------------------------------------------------------------------------------------------
PARAPHRASES = [  # (fact, question, answer): the question shares few words with the fact
    (
        "The Lisbon office holds its annual retreat in the hill village of Sortelha.",
        "Where does the team based in Portugal's capital go for its yearly getaway? They go to",
        "sortelha",
    ),
    (
        "Dr. Imani Okafor repaired the observatory's cracked primary mirror with a resin developed in Tromsø.",
        "Which city did the resin used to fix the telescope's broken main mirror come from? It came from",
        "troms",
    ),
    (
        "The Halvorsen bakery sells its rye loaves only on Thursdays, because its stone oven needs two days to heat.",
        "On which weekday can customers buy bread made from rye at the Halvorsen shop? On",
        "thursday",
    ),
    (
        "The museum's smallest exhibit, a carved cherry pit, was donated by a beekeeper from Ljubljana.",
        "Where did the person who gave the tiniest item in the museum's collection live? In",
        "ljubljana",
    ),
    (
        "Engineers chose titanium for the footbridge railings after salt spray corroded the steel prototypes.",
        "What metal replaced steel in the pedestrian crossing's handrails? The metal was",
        "titanium",
    ),
    (
        "The choir's founding conductor, Maren Sjoberg, composed the anthem sung at every winter concert.",
        "Who wrote the song that the singers perform at each cold-season performance? It was written by",
        "sjoberg",
    ),
]
DEVICES = ["router", "spectrometer", "centrifuge", "thermostat", "oscilloscope", "compressor", "gateway", "pump"]
COLOURS = ["amber", "cobalt", "crimson", "ivory", "olive", "slate", "teal", "umber"]
TOWNS = ["Varnholm", "Quillby", "Ostrava Nova", "Kestrel Bay", "Dunmarrow", "Eskerfield", "Brightwater", "Tolvik"]
KEEPERS = ["Ansel Marrow", "Petra Vilks", "Oskar Lindqvist", "Greta Hallam", "Tobias Ferrin", "Ilse Norden"]


def make_facts(rng: random.Random, keys: int = 4, distractors: int = 6, per_kind: int = 4) -> list[Fact]:
    def u() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128)))

    facts = []
    for i in range(keys + distractors):
        k, v = u(), u()
        text = f"One of the special magic uuids for {k} is: {v}."
        if i < keys:
            q = (
                f"What is the special magic uuid for {k} mentioned in the provided text? "
                f"The special magic uuid for {k} mentioned in the provided text is"
            )
            facts.append(Fact("uuid-key", text, q, v))
        else:
            facts.append(Fact("uuid-distractor", text))
    colours, devices = rng.sample(COLOURS, per_kind), rng.sample(DEVICES, per_kind)
    for i, (colour, device) in enumerate(zip(colours, devices)):
        if i % 2 == 0:
            code = f"0x{rng.getrandbits(32):08X}"
            text = f"The firmware checksum of the {colour} {device} is {code}."
            thing = f"the firmware checksum of the {colour} {device}"
            q = f"What is {thing}? The {thing[4:]} is"
        else:
            letters = rng.choice("BCDFGHKLMNPRSTVXZ") + rng.choice("AEIOU")
            code = f"{letters}-{rng.randint(1000, 9999)}-{rng.randint(10, 99)}"
            text = f"Part number {code} is the replacement gasket for the {colour} {device}."
            q = f"Which part number is the replacement gasket for the {colour} {device}? The part number is"
        facts.append(Fact("identifier", text, q, code))
    for town, keeper in zip(rng.sample(TOWNS, per_kind), rng.sample(KEEPERS, per_kind)):
        text = (
            f"According to the harbour records of {town}, the last keeper of its old lighthouse was a retired "
            f"sailor named {keeper}."
        )
        q = f"Who was the last keeper of the old lighthouse of {town}? The last keeper was a retired sailor named"
        facts.append(Fact("boundary", text, q, keeper.split()[-1]))
    for text, q, a in rng.sample(PARAPHRASES, per_kind):
        facts.append(Fact("paraphrase", text, q, a))
    return facts


_SENTENCE_END = re.compile(r"[.!?:]\s+(?=[A-Z])")


def plant(docs: list[tuple[str, str]], facts: list[Fact], tokenizer, chunk_tokens: int, rng: random.Random):
    """Each fact into its own document (spread evenly), in place. Boundary facts: at a chunk boundary, so the
    boundary falls between their subject and their answer; the others: after a sentence end."""
    if len(facts) > len(docs):
        raise ValueError(f"{len(facts)} facts need at least as many documents, not {len(docs)}")
    slots = [round(i * len(docs) / len(facts)) for i in range(len(facts))]
    order = list(range(len(facts)))
    rng.shuffle(order)
    for f, d in zip((facts[i] for i in order), slots):
        name, text = docs[d]
        if f.kind == "boundary":
            at = _boundary_position(text, f, tokenizer, chunk_tokens, rng)
            text = text[:at] + " " + f.text + text[at:]
        else:
            ends = [m.end() for m in _SENTENCE_END.finditer(text)] or [0]
            at = rng.choice(ends)
            text = text[:at] + f.text + " " + text[at:]
        docs[d] = (name, text)
        f.document = name


def answer_span(fact: Fact) -> tuple[int, int]:
    """Where the answer is in the fact's text (case-insensitive; the whole fact if it is not there verbatim)."""
    i = fact.text.lower().find(fact.answer.lower()) if fact.answer else -1
    return (i, i + len(fact.answer)) if i >= 0 else (0, len(fact.text))


def _boundary_position(text: str, fact: Fact, tokenizer, chunk_tokens: int, rng: random.Random) -> int:
    """A character offset (before a space) such that the fact inserted there is cut by a chunk boundary right
    before its answer: the answer's first token opens a chunk (checked by tokenising the result)."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True).offset_mapping
    head = " " + fact.text[: answer_span(fact)[0]]
    head_tokens = len(tokenizer(head, add_special_tokens=False).input_ids)
    boundaries = list(range(chunk_tokens, len(offsets) - chunk_tokens, chunk_tokens))
    rng.shuffle(boundaries)
    for b in boundaries[:20]:
        for shift in (0, 1, -1, 2, -2):
            j = b - head_tokens + shift
            at = offsets[j][0]
            if j <= 0 or text[at : at + 1] != " ":
                continue
            planted = text[:at] + " " + fact.text + text[at:]
            a0 = at + 1 + answer_span(fact)[0]
            got = tokenizer(planted, add_special_tokens=False, return_offsets_mapping=True).offset_mapping
            first = next(i for i, (x, y) in enumerate(got) if y > a0)
            if first == b and got[b][0] >= a0 - 1:
                return at
    raise ValueError(f"no place in this document puts a chunk boundary before the answer of {fact.text!r}")


def chunk_of_answer(text: str, fact: Fact, tokenizer, chunk_tokens: int) -> tuple[list[int], list[int]]:
    """-> (the chunks the fact overlaps, the chunks its answer overlaps), as the service cuts the document."""
    start = text.index(fact.text)
    a0, a1 = (start + i for i in answer_span(fact))
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True).offset_mapping

    def chunks(s: int, e: int) -> list[int]:
        return sorted({j // chunk_tokens for j, (a, b) in enumerate(offsets) if a < e and b > s})

    return chunks(start, start + len(fact.text)), chunks(a0, a1)
