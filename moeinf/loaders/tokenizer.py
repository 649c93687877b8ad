"""Text <-> token ids through the checkpoint's tokenizer.json (the `tokenizers` library)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from moeinf.errors import TokenizerError


class TextCodec:
    def __init__(self, path: Path):
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises plain Exception on a malformed file
            raise TokenizerError(f"{path}: expected a tokenizer.json the tokenizers library can read ({e})") from None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # add_special_tokens applies the file's post-processor, e.g. Mixtral's leading <s>; a
        # rendered chat template writes its own, so it is encoded without
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
