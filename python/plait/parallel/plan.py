"""Plans: plain data saying how to make a model tensor-parallel and where to cut it into stages.

A :class:`Plan` maps module-name patterns (``fnmatch``, ``*`` matching one or more name
parts such as a layer index) to **styles**, and names the decoder's pieces for the
pipeline split. It prints, round-trips through JSON and is checked against a model
(:func:`plait.parallel.check_plan`) before anything is communicated.

=================  ====================================================================
style              what happens to the matched module
=================  ====================================================================
``colwise``        Linear/Conv1D -> ColumnParallelLinear: output features split evenly
``colwise_q``      like colwise, by whole query heads (q projections)
``colwise_kv``     by the KV heads this rank's query heads use; KV heads are replicated
                   when tp > num_key_value_heads (their gradients summed over the ranks)
``colwise_qkv``    a fused ``[q | k | v]`` projection (GPT-2's ``c_attn``): each of q, k, v
                   split by heads
``rowwise``        Linear/Conv1D -> RowParallelLinear: input features split, output all-reduced
``vocab_embed``    Embedding -> VocabParallelEmbedding (the vocabulary padded to a multiple of tp)
``vocab_head``     the LM head: vocabulary-split logits for ``vocab_parallel_cross_entropy``;
                   padding logits are -inf, so padding never shows
``attention``      an attention module: its head-count attributes become this rank's
``replicate``      left whole on every rank (norms, position embeddings, small layers)
=================  ====================================================================

The decoder's pieces (``embed``, ``positions``, ``embed_dropout``, ``layers``, ``norm``, ``head``,
``rotary``) are module paths; ``family`` names the model family that runs the stages
(:mod:`plait.parallel.families`: ``"llama"``, ``"gpt2"``, ``"gemma2"``, ``"plait"``).
"""
from __future__ import annotations

import fnmatch
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Optional

STYLES = ("colwise", "colwise_q", "colwise_kv", "colwise_qkv", "rowwise", "vocab_embed", "vocab_head",
          "attention", "replicate")


@dataclass
class Plan:
    """How to parallelize one architecture; see the module docstring."""

    name: str
    family: str
    styles: dict[str, str]
    embed: str
    layers: str
    norm: str
    head: str
    positions: Optional[str] = None
    rotary: Optional[str] = None
    embed_dropout: Optional[str] = None
    tied: bool = False
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from .families import FAMILIES   # the registry imports this module

        if self.family not in FAMILIES:
            raise ValueError(f"plan {self.name!r}: unknown family {self.family!r}; use one of {sorted(FAMILIES)}")
        if not isinstance(self.styles, Mapping) or not self.styles:
            raise ValueError(f"plan {self.name!r}: styles must be a non-empty mapping of pattern -> style")
        for pattern, style in self.styles.items():
            if style not in STYLES:
                raise ValueError(f"plan {self.name!r}: pattern {pattern!r} has unknown style {style!r}; "
                                 f"use one of {STYLES}")
        for name in ("embed", "layers", "norm", "head"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"plan {self.name!r}: {name} must name a module path")

    # ------------------------------------------------------------------ matching
    def style_of(self, module_name: str) -> Optional[str]:
        """The style of the first pattern that matches ``module_name`` (None: left as is)."""
        for pattern, style in self.styles.items():
            if fnmatch.fnmatchcase(module_name, pattern):
                return style
        return None

    # ------------------------------------------------------------------ data
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"plan: unknown keys {unknown}; a plan has {sorted(known)}")
        return cls(**dict(data))

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"plan: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ValueError("plan: the JSON must be an object")
        return cls.from_dict(data)

    def __str__(self) -> str:
        width = max(len(p) for p in self.styles)
        rows = [f"Plan {self.name!r} (family {self.family}{', tied embeddings' if self.tied else ''})",
                f"  stages: embed={self.embed} positions={self.positions} embed_dropout={self.embed_dropout} "
                f"layers={self.layers} "
                f"norm={self.norm} head={self.head} rotary={self.rotary}"]
        rows += [f"  {pattern:<{width}}  {style}" for pattern, style in self.styles.items()]
        return "\n".join(rows)
