"""What a model family is to plait: its plan, its forward, its KV heads, its config fields.

A :class:`Family` is the one place that knows an architecture. The rest of plait asks it:

==========================  ================================================================
question                    asked by
==========================  ================================================================
``shipped_plan(type)``      ``plait.parallelize`` (plan None), ``plait.plans.for_model``
``check_config(config)``    ``from_pretrained``, ``parallelize``, the CLIs before any rank
                            starts: a field that changes the math and is not supported is
                            refused by name
``forward(stage, x, step)`` a pipeline stage's forward: training, ``logits`` and, with a
                            serving ``step``, the cached forward of ``plait serve``
``local_kv_heads``          the serving KV cache (heads this TP rank keeps)
``fields``                  docs/model-fields.md (generated), the fidelity tests
==========================  ================================================================

:class:`HFDecoder` is the base of transformers' decoders: plait calls the model's own decoder
layers (so every field their code reads is honoured exactly as in transformers) with plait's
attention function (:mod:`plait.parallel.attention`) and supplies only what the model-level
``forward`` of transformers does around them: embedding (and its scale, positions, dropout),
rotary tables, the final norm, the head (and its softcap). Adding a family is one module in
this package registering a subclass.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import nn

from ...heads import heads_for
from ..dropout import LayoutInvariantDropout
from ..plan import Plan

# Config fields that never change what a causal LM computes from token ids (identities, bookkeeping,
# generation defaults, heads other than the LM head). Every other field of a supported config class must
# be declared by its family (tests/test_fidelity.py checks this against transformers' config classes).
NOT_MATH = frozenset({
    "architectures", "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "problem_type", "initializer_range", "use_cache",
    "pad_token_id", "bos_token_id", "eos_token_id", "_name_or_path", "model_type", "transformers_version",
    "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "finetuning_task", "torchscript", "tie_encoder_decoder", "add_cross_attention_layers", "is_decoder",
})


@dataclass(frozen=True)
class Field:
    """One config field that changes the math: what plait does with it, and when it refuses it.

    ``refuse(value, config)`` returns the reason a value is not supported (None: supported).
    """

    name: str
    how: str
    refuse: Optional[Callable[[Any, Any], Optional[str]]] = None

    @property
    def status(self) -> str:
        return "honoured, some values refused" if self.refuse else "honoured"


def refuse_if_true(reason: str) -> Callable[[Any, Any], Optional[str]]:
    return lambda value, config: reason if value else None


class Family(ABC):
    """See the module docstring. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]                       # the Plan.family value
    model_types: ClassVar[tuple[str, ...]] = ()   # transformers model_type values it ships a plan for
    fields: ClassVar[tuple[Field, ...]] = ()
    sequence_parallel: ClassVar[bool] = False  # activations can be sequence shards
    serves: ClassVar[bool] = True              # plait serve / generate run it
    # Dropout modules on activations every TP rank holds whole (module-name patterns, fnmatch).
    whole_dropouts: ClassVar[tuple[str, ...]] = ()
    # Dropout modules whose probability the attention module passes to plait's attention function.
    attention_dropouts: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def shipped_plan(self, model_type: str) -> Plan:
        """plait's plan for transformers' ``model_type`` (one of :attr:`model_types`)."""

    def check_config(self, config) -> None:
        """ValueError naming the first field whose value this family does not support."""
        model_type = getattr(config, "model_type", self.name)
        for field in self.fields:
            if field.refuse is None or not hasattr(config, field.name):
                continue
            value = getattr(config, field.name)
            reason = field.refuse(value, config)
            if reason:
                raise ValueError(f"{model_type} config field {field.name}={value!r} is not supported by plait: "
                                 f"{reason}")

    @abstractmethod
    def forward(self, stage, x: torch.Tensor, step=None) -> torch.Tensor:
        """One pipeline stage's forward (the table in the stage module's docstring)."""

    def local_kv_heads(self, dims, tp: int, rank: int) -> int:
        """KV heads TP rank ``rank`` keeps (its cache's head count): :func:`plait.heads.heads_for`'s."""
        return len(heads_for(dims, tp, rank).kv_heads)

    def prefix_cache_refusal(self, config) -> Optional[str]:
        """Why equal prompt prefixes of this model may hold different keys and values (so plait serve must not
        share their cache blocks), or None when they may be shared."""
        return None

    def prepare_stage(self, stage) -> None:
        """Make ``stage`` ready to run after its TP rewrite (dropout modules, attention implementation)."""
        swap_dropouts(stage, self)


def check_ids(x: torch.Tensor) -> None:
    if x.dim() != 2 or x.is_floating_point():
        raise ValueError(f"the first pipeline stage takes token ids [batch, seq], got {x.dtype} {list(x.shape)}")


class HFDecoder(Family):
    """A transformers decoder-only LM whose layers plait calls itself (see the module docstring)."""

    def embed(self, stage, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return stage.part("embed")(ids)

    def layer_kwargs(self, stage, h: torch.Tensor, positions: torch.Tensor, step) -> dict:
        """Keyword arguments of every decoder layer call (besides the hidden states)."""
        return {"attention_mask": None}

    def head(self, stage, h: torch.Tensor) -> torch.Tensor:
        return stage.part("head")(stage.part("norm")(h))

    def forward(self, stage, x: torch.Tensor, step=None) -> torch.Tensor:
        """Token ids (first stage) or hidden states -> hidden states, or logits ``[b, s, V/tp]`` on the last.

        With a serving ``step`` (:class:`plait.serve.forward.CachedStep`) tokens sit at the step's positions,
        attention runs over the KV cache, and the last stage returns the logits of each row's last token
        ``[b, V/tp]``.
        """
        if stage.first:
            check_ids(x)
        positions = step.positions if step is not None else \
            torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        h = self.embed(stage, x, positions) if stage.first else x
        if stage.layer_paths:
            kwargs = self.layer_kwargs(stage, h, positions, step)
            if step is not None:
                kwargs["plait_step"] = step
            for layer in stage.layers():
                out = layer(h, **kwargs)
                h = out[0] if isinstance(out, tuple) else out
        if stage.last:
            if step is not None:
                h = step.last_tokens(h)
            h = self.head(stage, h)
        return h

    def prepare_stage(self, stage) -> None:
        from ..attention import use_plait_attention

        super().prepare_stage(stage)
        if stage.hf_config is not None:
            use_plait_attention(stage.hf_config)


def swap_dropouts(stage: nn.Module, family: Family) -> None:
    """Replace the stage's ``nn.Dropout`` modules on whole activations by layout-invariant ones (keyed by
    their names); leave attention-probability dropouts (their ``p`` goes to the attention function) as
    they are. Any other dropout with ``p > 0`` is refused, naming it: plait cannot tell which slice of
    the activation a rank holds there."""
    import fnmatch

    for name, module in list(stage.named_modules()):
        if not isinstance(module, nn.Dropout):
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in family.attention_dropouts):
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in family.whole_dropouts):
            parent, _, leaf = name.rpartition(".")
            new = LayoutInvariantDropout(module.p, name)
            new.train(module.training)
            setattr(stage.get_submodule(parent) if parent else stage, leaf, new)
        elif module.p > 0:
            raise ValueError(f"{name} is a dropout (p={module.p}) that the {family.name!r} family does not know; "
                             f"plait cannot make its masks agree across ranks. Set its probability to 0 or add "
                             f"it to the family's dropout sites")
