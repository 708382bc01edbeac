"""Sampled tokens as displayable pieces: each piece is the text of one token, or of the few tokens
that only together decode to whole characters (a byte-level BPE splits a CJK character or an emoji
over several tokens; each alone decodes to U+FFFD).

Each piece's text is the difference between decoding a short window with and without it, as
vLLM's incremental detokenizer does, so tokenizers that drop a word's leading space when a token
is decoded alone (SentencePiece's `▁`) still show it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

WINDOW = 4  # tokens of left context decoded with each piece
MAX_GROUP = 4  # a UTF-8 character is at most 4 bytes, so at most 4 byte tokens


@dataclass(frozen=True)
class Piece:
    text: str
    ids: tuple[int, ...]
    logprobs: tuple[float | None, ...]


def token_pieces(ids: Sequence[int], logprobs: Sequence[float] | None,
                 decode: Callable[[list[int]], str]) -> list[Piece]:
    """`ids` split into pieces whose texts concatenate to what the model sampled (see the module)."""
    ids = list(ids)
    lps: list[float | None] = [None] * len(ids)
    if logprobs is not None and len(logprobs) == len(ids):
        lps = list(logprobs)
    pieces: list[Piece] = []
    start = 0
    while start < len(ids):
        left = max(0, start - WINDOW)
        prefix = decode(ids[left:start]) if left < start else ""
        end = start + 1
        full = decode(ids[left:end])
        while full.endswith("\ufffd") and end < min(len(ids), start + MAX_GROUP):
            end += 1
            full = decode(ids[left:end])
        if full.endswith("\ufffd") and end - start > 1:  # not a split character after all
            end = start + 1
            full = decode(ids[left:end])
        text = full[len(prefix):] if full.startswith(prefix) else decode(ids[start:end])
        pieces.append(Piece(text, tuple(ids[start:end]), tuple(lps[start:end])))
        start = end
    return pieces
