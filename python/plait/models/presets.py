"""Named sizes of the reference GPT, and the ``--gpt`` spec of ``plait train`` that picks one.

A spec is a preset, explicit dimensions, or a preset with overrides::

    gpt-tiny,vocab=512                        # a preset; its vocabulary given
    layers=4,hidden=64,heads=4,vocab=512      # explicit dimensions
    {"preset": "gpt2-small", "layers": 6}     # the same as a mapping (a YAML/JSON job file)

=============  ======  ======  =====  =====  =====  ===============================================
preset         layers  hidden  heads  vocab  seq    source
=============  ======  ======  =====  =====  =====  ===============================================
gpt-tiny       2       64      4      -      -      CPU demos and tests
gpt-mini       4       128     4      -      -      CPU demos
gpt2-small     12      768     12     50257  1024   Radford et al. 2019, "Language Models are
gpt2-medium    24      1024    16     50257  1024   Unsupervised Multitask Learners", Table 2
gpt2-large     36      1280    20     50257  1024   (d_model, layers; 64-dim heads; GPT-2's BPE
gpt2-xl        48      1600    25     50257  1024   vocabulary and context)
=============  ======  ======  =====  =====  =====  ===============================================

Keys: ``layers``, ``hidden``, ``heads``, ``ffn`` (default 4 x hidden), ``vocab`` (the
tokenizer's size; required where the preset has none), ``seq`` (rows of the position table:
the longest sequence the model takes; default the preset's, else the job's sequence length)
and ``activation`` (default gelu). The plait GPT differs from GPT-2 in two ways that keep
it a plain reference model: its head is not tied to the embedding, and it has no dropout.
"""
from __future__ import annotations

import difflib
from typing import Any, Mapping, Optional, Union

import torch

from .config import GPTConfig

PRESETS: dict[str, dict[str, int]] = {
    "gpt-tiny": dict(layers=2, hidden=64, heads=4),
    "gpt-mini": dict(layers=4, hidden=128, heads=4),
    "gpt2-small": dict(layers=12, hidden=768, heads=12, vocab=50257, seq=1024),
    "gpt2-medium": dict(layers=24, hidden=1024, heads=16, vocab=50257, seq=1024),
    "gpt2-large": dict(layers=36, hidden=1280, heads=20, vocab=50257, seq=1024),
    "gpt2-xl": dict(layers=48, hidden=1600, heads=25, vocab=50257, seq=1024),
}
_INT_KEYS = ("layers", "hidden", "heads", "ffn", "vocab", "seq")
KEYS = _INT_KEYS + ("activation",)


def parse_gpt_spec(spec: Union[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The settings of a spec (module doc), with a preset's values filled in; ValueError naming the
    unknown preset or key, or the value that is not a positive whole number."""
    if isinstance(spec, Mapping):
        items = dict(spec)
    elif isinstance(spec, str) and spec.strip():
        items = {}
        for part in (p.strip() for p in spec.split(",")):
            key, eq, value = part.partition("=")
            if not eq:
                if "preset" in items:
                    raise ValueError(f"gpt {spec!r}: two presets ({items['preset']!r} and {part!r})")
                items["preset"] = part
            else:
                items[key.strip()] = value.strip()
    else:
        raise ValueError(f"gpt must be a preset name or key=value dimensions, got {spec!r}")
    preset = items.pop("preset", None)
    out: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            close = difflib.get_close_matches(str(preset), list(PRESETS), n=1)
            raise ValueError(f"gpt: unknown preset {preset!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                             + f" (presets: {', '.join(PRESETS)}; or give layers=,hidden=,heads=,vocab=)")
        out.update(PRESETS[preset])
    for key, value in items.items():
        if key not in KEYS:
            close = difflib.get_close_matches(str(key), list(KEYS) + ["preset"], n=1)
            raise ValueError(f"gpt: unknown key {key!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                             + f" (keys: preset, {', '.join(KEYS)})")
        out[key] = value if key == "activation" else _positive(key, value)
    missing = [k for k in ("layers", "hidden", "heads", "vocab") if k not in out]
    if missing:
        raise ValueError(f"gpt {_show(spec)}: missing {', '.join(missing)} (e.g. gpt-tiny,vocab=512 or "
                         f"layers=4,hidden=64,heads=4,vocab=512; vocab is the tokenizer's size)")
    return out


def gpt_config(spec: Union[str, Mapping[str, Any]], seq: int, dtype: torch.dtype = torch.float32) -> GPTConfig:
    """The :class:`GPTConfig` of a spec for a job of sequence length ``seq``; ValueError if it does not fit."""
    s = parse_gpt_spec(spec)
    positions = s.get("seq", seq)
    if seq > positions:
        raise ValueError(f"gpt {_show(spec)}: the position table has seq={positions} rows, fewer than the job's "
                         f"sequence length {seq}; use a shorter --seq or a larger seq= in the spec")
    try:
        return GPTConfig(vocab_size=s["vocab"], num_layers=s["layers"], hidden=s["hidden"], num_heads=s["heads"],
                         seq_len=positions, ffn_hidden=s.get("ffn"), activation=s.get("activation", "gelu"),
                         dtype=dtype)
    except ValueError as err:
        raise ValueError(f"gpt {_show(spec)}: {err}") from None


def _positive(key: str, value: Any) -> int:
    try:
        number = int(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or number < 1 or (isinstance(value, float) and value != number):
        raise ValueError(f"gpt: {key} must be a positive whole number, got {value!r}")
    return number


def _show(spec: Union[str, Mapping[str, Any], None]) -> Optional[str]:
    return repr(spec if isinstance(spec, str) else dict(spec or {}))
