"""Drafts from memory (prompt lookup decoding): an answer over retrieved text mostly quotes it, so the tokens that
follow the question's last words where they occur in the retrieved chunks are a likely continuation. The batch
reads them after the question in the same pass and keeps the longest run the model itself predicts, greedy token
for token (batch.py): one pass can give several tokens of the answer, and the answer is the one decoding token by
token gives (up to float rounding, as any change of a pass's shape). vLLM's "ngram" speculative decoding and
Saxena's prompt lookup decoding are the same idea over the prompt."""

from __future__ import annotations


def lookup_draft(prompt: list[int], memory: list[list[int]], k: int, longest: int = 4, shortest: int = 2) -> list[int]:
    """Up to k tokens that follow the prompt's last n tokens (n from `longest` down to `shortest`: the longest match
    wins) at their last occurrence in `memory` (the retrieved chunks' token ids in reading order, read as one text:
    the best-scored run is read last, nearest the question); [] when they occur nowhere or k is 0."""
    if k <= 0:
        return []
    text = [t for chunk in memory for t in chunk]
    for n in range(min(longest, len(prompt)), shortest - 1, -1):
        tail = prompt[-n:]
        for i in range(len(text) - n - 1, -1, -1):  # a match with at least one token after it
            if text[i : i + n] == tail:
                return text[i + n : i + n + k]
    return []
