"""StreamedText: one streamed sequence's text, a piece per generated token."""

from __future__ import annotations

from moeinf.loaders.tokenizer import TextCodec


class StreamedText:
    """One streamed sequence's text, handed out a piece per token: the pieces add up to the text of
    all its tokens. A token that ends inside a multi-byte character decodes to U+FFFD; its piece
    is "" and the character comes with the token that completes it (or with the last token)."""

    def __init__(self, codec: TextCodec | None):
        self.codec = codec  # None: the checkpoint has no tokenizer, and every piece is None
        self.tokens: list[int] = []
        self.sent = ""  # the text handed out so far

    def add(self, token: int, last: bool) -> str | None:
        self.tokens.append(token)
        if self.codec is None:
            return None
        whole = self.codec.decode(self.tokens)
        if not last and whole.endswith("\ufffd"):
            return ""
        piece, self.sent = whole[len(self.sent) :], whole
        return piece
