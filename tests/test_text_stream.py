"""TextStream: the streamed pieces of an answer join to exactly the whole answer (pure logic, a byte tokenizer)."""

import pytest

from engram.decoder.generate import TextStream


class ByteTokenizer:
    """Each token one UTF-8 byte, decoded as byte-level BPE decoders do: an unfinished character shows as U+FFFD."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize(
    "answer",
    ["  The code is 4417.  ", "naïve café — 東京 ✓", "\n\n", "a  b\n\nc ", "€", "end with space "],
)
def test_pieces_join_to_the_stripped_answer(answer):
    stream = TextStream(ByteTokenizer())
    pieces = [stream.push(b) for b in answer.encode()]
    last, whole = stream.finish()
    assert whole == answer.strip()
    assert "".join(pieces) + last == whole
    assert not any("\ufffd" in p for p in pieces)  # half a character is never sent


def test_pieces_arrive_as_tokens_do():
    stream = TextStream(ByteTokenizer())
    assert [stream.push(b) for b in b" ab c"] == ["", "a", "b", "", " c"]  # leading space dropped, inner kept
