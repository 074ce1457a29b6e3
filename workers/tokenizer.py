"""Text <-> token ids through a model directory's tokenizer.json (the `tokenizers` library)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

# Prompt tokens kept as decoding context, so the first generated token gets its leading space
# (and a multi-byte character split across the prompt boundary decodes whole).
_CONTEXT_TOKENS = 6


class Tokenizer:
    """A thin typed wrapper over tokenizers.Tokenizer."""

    def __init__(self, tokenizer_json: Path | str) -> None:
        path = Path(tokenizer_json)
        if not path.is_file():
            raise ValueError(f"model: no tokenizer.json at {str(path)!r}")
        self._tok = _HFTokenizer.from_file(str(path))

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> Tokenizer | None:
        """The model's tokenizer, or None when the directory has no tokenizer.json."""
        path = Path(model_dir) / "tokenizer.json"
        return cls(path) if path.is_file() else None

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (BOS etc. added when the tokenizer's post-processor says so)."""
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `token_ids`; incomplete UTF-8 at the end shows as U+FFFD."""
        return str(self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens))


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text without splitting a character.

    Decodes a short window [prefix_offset, end) and subtracts the text of [prefix_offset,
    read_offset); text is released only when it no longer ends in an incomplete character.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int]) -> None:
        self._tok = tokenizer
        self._ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def add(self, token_ids: Sequence[int]) -> str:
        """Append tokens; return the text they complete (maybe '' while a character is partial)."""
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        prefix = self._tok.decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._tok.decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # nothing new yet, or a multi-byte character is still incomplete
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        """At the end: whatever is still held back (an incomplete character shows as U+FFFD)."""
        prefix = self._tok.decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._tok.decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix) :] if len(full) > len(prefix) else ""
