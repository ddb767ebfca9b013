"""GPTConfig: the reference model's dimensions, validated where they are made."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from ..tp.activations import check_activation


@dataclass
class GPTConfig:
    """A GPT-2-style decoder. ``ffn_hidden`` defaults to ``4 * hidden``.

    Tensor parallelism splits heads, FFN and vocabulary, so those must divide
    by the TP size; :meth:`check_layout` says which does not.
    """

    vocab_size: int
    num_layers: int
    hidden: int
    num_heads: int
    seq_len: int
    ffn_hidden: Optional[int] = None
    activation: str = "gelu"
    sequence_parallel: bool = False
    layernorm_eps: float = 1e-5
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.ffn_hidden is None:
            self.ffn_hidden = 4 * self.hidden
        for name in ("vocab_size", "num_layers", "hidden", "num_heads", "seq_len", "ffn_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.hidden % self.num_heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by num_heads={self.num_heads}")
        check_activation(self.activation)
        if self.activation is None:
            raise ValueError("GPTConfig.activation must name an activation")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    # The names plans and loaders read from any model's config (transformers' spelling).
    num_attention_heads = property(lambda self: self.num_heads)
    num_key_value_heads = property(lambda self: self.num_heads)
    hidden_size = property(lambda self: self.hidden)
    tie_word_embeddings = False

    def check_layout(self, tp: int, pp: int = 1, num_virtual: int = 1) -> None:
        """Raise ValueError, saying how to fix it, if the model cannot be split this way."""
        for what, value in (("num_heads", self.num_heads), ("ffn_hidden", self.ffn_hidden),
                            ("vocab_size", self.vocab_size)):
            if value % tp:
                raise ValueError(f"{what}={value} is not divisible by tp={tp}; choose a TP size that divides "
                                 f"it{' or pad the vocabulary' if what == 'vocab_size' else ''}")
        if self.sequence_parallel and self.seq_len % tp:
            raise ValueError(f"sequence_parallel needs seq_len={self.seq_len} divisible by tp={tp}")
        if self.num_layers < pp * num_virtual:
            raise ValueError(f"num_layers={self.num_layers} is fewer than pp x virtual stages = "
                             f"{pp} x {num_virtual}; use fewer stages or more layers")

    def to_dict(self) -> dict:
        """JSON-able form (kept in a training checkpoint's train_state.json)."""
        data = asdict(self)
        data["dtype"] = str(self.dtype).replace("torch.", "")
        return data
