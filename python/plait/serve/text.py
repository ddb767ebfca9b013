"""Text around token ids: the model directory's tokenizer, incremental decoding and stop strings.

Text is always ``tokenizer.decode(ids, skip_special_tokens=True)`` of the ids generated so
far, exactly as transformers decodes them; a stream sends the growth of that string. The
tail that could still become a stop string (or an incomplete UTF-8 character, shown as
U+FFFD) is held back until the next token decides it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(directory: str):
    """``transformers.AutoTokenizer.from_pretrained(directory)`` when the directory has a tokenizer, else None."""
    if not any((Path(directory) / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


class TextStream:
    """The decoded text of one request's generated ids, its stream deltas, and its stop strings."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.text = ""          # the final text so far (cut at a stop string once one appears)
        self.sent = 0           # characters of ``text`` already handed out
        self.stopped = False

    def update(self, ids: Sequence[int]) -> None:
        """Decode ``ids`` (all generated so far); sets ``stopped`` when a stop string appears."""
        if self.tokenizer is None or self.stopped:
            return
        text = self.tokenizer.decode(list(ids), skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, self.stopped = text[:cut], True
        self.text = text

    def delta(self, final: bool) -> str:
        """Text not yet handed out; unless ``final``, without a tail that a later token may change."""
        end = len(self.text)
        if not final:
            end -= self._unsettled_tail()
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out

    def _unsettled_tail(self) -> int:
        text = self.text
        hold = 0
        while hold < len(text) and text[len(text) - 1 - hold] == "\ufffd":
            hold += 1
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        return hold


def eos_ids(model_config, directory: Optional[str] = None) -> frozenset[int]:
    """End-of-sequence ids: the generation config's when the directory has one, else the model config's."""
    value = None
    if directory is not None and (Path(directory) / "generation_config.json").is_file():
        from transformers import GenerationConfig

        value = GenerationConfig.from_pretrained(str(directory), local_files_only=True).eos_token_id
    if value is None:
        value = getattr(model_config, "eos_token_id", None)
    if value is None:
        return frozenset()
    return frozenset([value] if isinstance(value, int) else value)
