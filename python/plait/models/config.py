"""GPTConfig: the reference model's dimensions, validated where they are made."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from ..config import ModelShape
from ..tp.activations import check_activation


@dataclass
class GPTConfig:
    """A GPT-2-style decoder. ``ffn_hidden`` defaults to ``4 * hidden``.

    Whether it fits a layout is :meth:`plait.ParallelConfig.check_model`'s verdict on :meth:`shape`
    (heads and FFN split over TP; the vocabulary is padded).
    """

    vocab_size: int
    num_layers: int
    hidden: int
    num_heads: int
    seq_len: int
    ffn_hidden: Optional[int] = None
    activation: str = "gelu"
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

    def shape(self, seq_len: Optional[int] = None) -> ModelShape:
        """The dimensions :meth:`plait.ParallelConfig.check_model` judges a layout by, for training on
        sequences of ``seq_len`` tokens (default: ``self.seq_len``, the position table's length)."""
        return ModelShape(num_layers=self.num_layers, num_heads=self.num_heads, ffn_hidden=self.ffn_hidden,
                          vocab_size=self.vocab_size, seq_len=seq_len or self.seq_len)

    def to_dict(self) -> dict:
        """JSON-able form (kept in a training checkpoint's train_state.json)."""
        data = asdict(self)
        data["dtype"] = str(self.dtype).replace("torch.", "")
        return data
