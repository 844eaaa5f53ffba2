"""PDF files for `engram write`: their text layer is the document (pypdf); a scan, a broken or an encrypted PDF is
refused with the reason, never sent. The folder sync with PDFs through a real service: tests/test_documents.py."""

import re

import pytest

from engram.coordinator.ingest import Unreadable, document_bytes


def tiny_pdf(pages: list[str]) -> bytes:
    """A valid PDF with one line of Helvetica text per page, built by hand (objects, xref table, trailer)."""
    objs = ["<< /Type /Catalog /Pages 2 0 R >>", "", "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for text in pages:
        body = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET" if text else ""
        objs.append(f"<< /Length {len(body)} >>\nstream\n{body}\nendstream")
        objs.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {len(objs)} 0 R "
            "/Resources << /Font << /F1 3 0 R >> >> >>"
        )
        kids.append(f"{len(objs)} 0 R")
    objs[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, obj in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{obj}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


MANUAL = ["The harbour gate code is 4417.", "Second page: the lighthouse keeper is Ada Quill."]


def test_a_pdf_is_stored_as_its_text_layer():
    text = document_bytes(tiny_pdf(MANUAL), "manual.pdf").decode()
    assert text == "\n\n".join(MANUAL)
    assert document_bytes(tiny_pdf(MANUAL), "no-suffix") == text.encode()  # known by its signature too
    assert document_bytes("naïve text\n".encode(), "notes.md") == "naïve text\n".encode()  # other files as they are


@pytest.mark.parametrize(
    "data,why",
    [
        (tiny_pdf(["", ""]), "without a text layer (2 page(s)"),
        (b"%PDF-1.4\nnot really a pdf", "not a PDF pypdf can read"),
        (tiny_pdf(MANUAL)[:180], "not a PDF pypdf can read"),
        (b"caf\xe9 latin-1", "not UTF-8 text"),
        (b" \n\t", "empty"),
    ],
)
def test_files_without_text_are_refused_with_the_reason(data, why):
    with pytest.raises(Unreadable, match=re.escape(why)):
        document_bytes(data, "x.pdf" if data.startswith(b"%PDF") else "x.txt")


def test_an_encrypted_pdf_is_refused():
    import io

    from pypdf import PdfReader, PdfWriter

    w = PdfWriter(clone_from=PdfReader(io.BytesIO(tiny_pdf(MANUAL))))
    w.encrypt(user_password="s3cret", algorithm="RC4-128")
    buf = io.BytesIO()
    w.write(buf)
    with pytest.raises(Unreadable, match="encrypted PDF"):
        document_bytes(buf.getvalue(), "locked.pdf")
