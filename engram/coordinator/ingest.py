"""`engram write PATH`: a file, stdin, or a folder synced into a namespace.

A folder is walked recursively (hidden files and folders skipped); each matching file is one document whose id is
its path relative to the folder. A file whose text is already stored under its id (same sha256, as ListDocuments
reports it) is skipped, so running the command again is a sync: new files are written, changed ones replaced
(deleted, then written: absent from answers for that moment), unchanged ones left alone, and with `prune`
documents whose file is gone are deleted. Files that are not UTF-8 text are reported and skipped.

PDF files (`.pdf`) are read by pypdf: the text layer of every page, pages apart by a blank line, is the document
(what is stored, listed by its sha256 and read back); a PDF without a text layer (a scan) or one pypdf cannot
read is reported and skipped, never sent.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

TEXT_SUFFIXES = (".md", ".markdown", ".txt", ".text", ".rst", ".pdf")  # what a folder gives by default (no --glob)


class Unreadable(ValueError):
    """A file that gives no text to store; the message says why (it is shown to the user as is)."""


def document_bytes(data: bytes, name: str = "") -> bytes:
    """The UTF-8 text a file's bytes are stored as: themselves, or a PDF's text layer (by the name's suffix or
    the PDF signature). Unreadable if there is none."""
    if name.lower().endswith(".pdf") or data.startswith(b"%PDF-"):
        data = pdf_text(data).encode("utf-8")
    else:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise Unreadable("not UTF-8 text") from None
    if not data.strip():
        raise Unreadable("empty")
    return data


def pdf_text(data: bytes) -> str:
    """Every page's text layer (pypdf), pages apart by a blank line."""
    import io
    import logging

    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its warnings about sloppy files are not the user's concern
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise Unreadable("an encrypted PDF (decrypt it first)")
        pages = [page.extract_text() or "" for page in reader.pages]
    except Unreadable:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as e:
        raise Unreadable(f"not a PDF pypdf can read ({type(e).__name__})") from None
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    if not text:
        raise Unreadable(f"a PDF without a text layer ({len(pages)} page(s): a scan? run OCR on it first)")
    return text


@dataclass
class Synced:
    written: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    pruned: list[str] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        rate = f" = {self.tokens / self.seconds:,.0f} tokens/s" if self.seconds and self.tokens else ""
        parts = [f"{len(self.written)} written", f"{len(self.replaced)} replaced", f"{len(self.unchanged)} unchanged"]
        parts += [f"{len(self.skipped)} skipped"] + ([f"{len(self.pruned)} pruned"] if self.pruned else [])
        return f"{', '.join(parts)}; {self.tokens} tokens in {self.seconds:.1f} s{rate}"


def files_of(root: Path, pattern: str | None) -> list[tuple[str, Path]]:
    """(document id, file) for every file the folder gives: matching `pattern` (a glob relative to the folder,
    e.g. "**/*.md"), or by default every Markdown or plain-text file; hidden ones never."""
    found = root.glob(pattern) if pattern else (p for p in root.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES)
    out = []
    for p in found:
        rel = p.relative_to(root)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out.append((rel.as_posix(), p))
    return sorted(out)


def sync_folder(client, root: Path, namespace: str, pattern: str | None = None, prune: bool = False) -> Synced:
    """Write the folder's files into the namespace as documents (see the module's doc), with a progress bar
    over files and bytes."""
    from tqdm import tqdm

    t0, out = time.perf_counter(), Synced()
    files = files_of(root, pattern)
    stored = {d.document_id: d.sha256 for d in client.documents(namespace)}
    total = sum(p.stat().st_size for _, p in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"sync {root.name or root}") as bar:
        for i, (doc_id, path) in enumerate(files):
            bar.set_postfix_str(f"file {i + 1}/{len(files)}")
            size = path.stat().st_size
            try:
                data = document_bytes(path.read_bytes(), path.name)
            except Unreadable as e:
                out.skipped.append((doc_id, str(e)))
                bar.update(size)
                continue
            digest = hashlib.sha256(data).hexdigest()
            if stored.get(doc_id) == digest:
                out.unchanged.append(doc_id)
                bar.update(size)
                continue
            if doc_id in stored:
                client.delete(doc_id, namespace=namespace)
                out.replaced.append(doc_id)
            else:
                out.written.append(doc_id)
            sent = size / len(data)  # the bar counts the file's bytes; a PDF's text is fewer
            out.tokens += client.write(
                [(doc_id, data)], namespace=namespace, progress=lambda n, per=sent: bar.update(n * per)
            ).tokens
    if prune:
        kept = {doc_id for doc_id, _ in files}
        for doc_id in sorted(set(stored) - kept):
            client.delete(doc_id, namespace=namespace)
            out.pruned.append(doc_id)
    out.seconds = time.perf_counter() - t0
    return out


def write_one(client, data: bytes, doc_id: str, namespace: str) -> str:
    """One document (a file or stdin) with a progress bar -> what was stored."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    with tqdm(total=len(data), unit="B", unit_scale=True, desc=f"write {doc_id}") as bar:
        r = client.write([(doc_id, data)], namespace=namespace, progress=bar.update)  # the server checks UTF-8
    dt = time.perf_counter() - t0
    return (
        f"stored {r.documents} document(s): {r.chunks} chunks, {r.tokens} tokens ({r.new_blocks} new blocks) "
        f"in {dt:.1f} s = {r.tokens / dt:,.0f} tokens/s"
    )
