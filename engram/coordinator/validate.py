"""Request checks shared by the gRPC and the HTTP front ends: one message per mistake, saying what to fix."""

from __future__ import annotations

from ..errors import EngramError, ErrorCode
from .config import EngramConfig

INVALID = ErrorCode.INVALID


def check_name(kind: str, value: str) -> None:
    if not value or len(value) > 256 or any(ch in value for ch in "\x00\n\r"):
        raise EngramError(INVALID, f"{kind} must be 1-256 characters without NUL or newlines, got {value[:40]!r}")


def check_question(cfg: EngramConfig, question: str) -> None:
    if not question.strip():
        raise EngramError(INVALID, "the question is empty")
    if len(question) > cfg.server.max_question_chars:
        raise EngramError(
            INVALID,
            f"the question is {len(question)} characters; the limit is "
            f"{cfg.server.max_question_chars} (server.max_question_chars)",
        )


def ask_options(cfg: EngramConfig, top_k: int, max_new: int = 0, names=("top_k", "max_new_tokens")) -> tuple[int, int]:
    """(top_k, max_new_tokens) as asked, 0 = the server's default, within the server's limits. `names`: the
    fields as the caller's API spells them."""
    a = cfg.ask
    if top_k < 0 or top_k > a.max_top_k:
        raise EngramError(INVALID, f"{names[0]} must be between 1 and {a.max_top_k}, got {top_k}")
    if max_new < 0 or max_new > a.max_max_new_tokens:
        raise EngramError(INVALID, f"{names[1]} must be between 1 and {a.max_max_new_tokens}, got {max_new}")
    return top_k or a.top_k, max_new or a.max_new_tokens


def check_mode(mode: str) -> str:
    if mode not in ("", "memory", "rag"):
        raise EngramError(INVALID, f"mode must be 'memory' or 'rag', got {mode[:40]!r}")
    return mode or "memory"
