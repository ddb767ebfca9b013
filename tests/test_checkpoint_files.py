"""Damaged checkpoints: a missing, empty, truncated, garbage or foreign meta.json or shard file is a
ValueError that names the file, never a JSONDecodeError, an OSError from deep inside or a KeyError."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plait.models.checkpoint import FORMAT, export_full_state_dict, read_meta

WEIGHT = torch.arange(8.0).view(4, 2)   # split over 2 TP ranks along dim 1
BIAS = torch.tensor([1.0, 2.0, 3.0, 4.0])   # replicated


def write_checkpoint(path: Path) -> Path:
    """A small valid checkpoint in plait's format: one pipeline stage, TP 2, a split and a replicated tensor."""
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "config": {}, "step": 3, "layout": {"dp": 1, "pp": 1, "tp": 2, "num_virtual": 1},
            "params": {"w": {"shape": [4, 2], "split": 1, "pp_rank": 0},
                       "b": {"shape": [4], "split": None, "pp_rank": 0}}}
    (path / "meta.json").write_text(json.dumps(meta))
    for tp_rank in range(2):
        shard = {"w": {"param": WEIGHT[:, tp_rank:tp_rank + 1].clone(), "state": {}}}
        if tp_rank == 0:
            shard["b"] = {"param": BIAS.clone(), "state": {}}
        torch.save(shard, path / f"shard-pp0-tp{tp_rank}.pt")
    return path


def test_valid_checkpoint_reads(tmp_path: Path) -> None:
    state = export_full_state_dict(write_checkpoint(tmp_path / "ckpt"))
    assert torch.equal(state["w"], WEIGHT) and torch.equal(state["b"], BIAS)


def _damage_meta(path: Path, how: str) -> None:
    meta = path / "meta.json"
    text = meta.read_text()
    document = json.loads(text)
    if how == "missing":
        meta.unlink()
    elif how == "empty":
        meta.write_text("")
    elif how == "truncated":
        meta.write_text(text[: len(text) // 2])
    elif how == "garbage":
        meta.write_bytes(b"\x80\x81\xfe\x00 not json")
    elif how == "list":
        meta.write_text("[1, 2]")
    elif how == "format":
        meta.write_text(json.dumps({**document, "format": "someone-else-v9"}))
    elif how == "layout":
        meta.write_text(json.dumps({**document, "layout": {"dp": 1, "pp": 0, "tp": "2"}}))
    elif how == "params":
        meta.write_text(json.dumps({**document, "params": {"w": {"shape": [4, 2], "split": 5, "pp_rank": 0}}}))


@pytest.mark.parametrize("how,fragment", [
    ("missing", "is not a plait checkpoint: no meta.json"), ("empty", "the file is empty"),
    ("truncated", "not valid JSON"), ("garbage", "cannot read it"), ("list", "unknown checkpoint format"),
    ("format", "unknown checkpoint format 'someone-else-v9'"), ("layout", "'layout' must give dp, pp and tp"),
    ("params", "'params' must map each name"),
])
def test_damaged_meta_names_the_file(tmp_path: Path, how: str, fragment: str) -> None:
    path = write_checkpoint(tmp_path / "ckpt")
    _damage_meta(path, how)
    with pytest.raises(ValueError) as info:
        export_full_state_dict(path)
    assert fragment in str(info.value) and str(path) in str(info.value)


def _damage_shard(file: Path, how: str) -> None:
    data = file.read_bytes()
    if how == "missing":
        file.unlink()
    elif how == "empty":
        file.write_bytes(b"")
    elif how == "truncated":
        file.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        file.write_bytes(b"PK\x03\x04 this is not a torch file")
    elif how == "other object":
        torch.save([1, 2, 3], file)
    elif how == "lacks a parameter":
        torch.save({"x": {"param": torch.zeros(1), "state": {}}}, file)


@pytest.mark.parametrize("how,fragment", [
    ("missing", "missing; the checkpoint"), ("empty", "cannot read this shard"), ("truncated", "cannot read this shard"),
    ("garbage", "cannot read this shard"), ("other object", "not a plait checkpoint shard"),
    ("lacks a parameter", "no valid entry for parameter 'w'"),
])
def test_damaged_shard_names_the_file(tmp_path: Path, how: str, fragment: str) -> None:
    path = write_checkpoint(tmp_path / "ckpt")
    file = path / "shard-pp0-tp1.pt"
    _damage_shard(file, how)
    with pytest.raises(ValueError) as info:
        export_full_state_dict(path)
    assert fragment in str(info.value) and str(file) in str(info.value)


FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(keep=st.floats(0, 1), flip=st.one_of(st.none(), st.integers(0, 10 ** 6)))
def test_any_cut_or_flipped_byte_of_a_shard(tmp_path_factory: pytest.TempPathFactory, keep: float, flip) -> None:
    """A shard cut anywhere, or with one byte changed, reads correctly or is a ValueError naming it."""
    path = write_checkpoint(tmp_path_factory.mktemp("ckpt"))
    file = path / "shard-pp0-tp0.pt"
    data = bytearray(file.read_bytes())
    data = data[: int(len(data) * keep)]
    if flip is not None and data:
        data[flip % len(data)] ^= 0xFF
    file.write_bytes(bytes(data))
    try:
        state = export_full_state_dict(path)
    except ValueError as exc:
        assert str(file) in str(exc)
        return
    assert set(state) == {"w", "b"} and state["w"].shape == (4, 2)


@FUZZ
@given(raw=st.one_of(st.binary(max_size=80), st.text(max_size=80).map(str.encode),
                     st.recursive(st.one_of(st.none(), st.integers(), st.text(max_size=5)),
                                  lambda c: st.one_of(st.lists(c, max_size=3),
                                                      st.dictionaries(st.sampled_from(
                                                          ["format", "config", "layout", "params", "step", "dp",
                                                           "pp", "tp", "shape", "split", "pp_rank"]), c, max_size=4)),
                                  max_leaves=10).map(lambda d: json.dumps(d).encode())))
def test_any_meta_json(tmp_path_factory: pytest.TempPathFactory, raw: bytes) -> None:
    path = tmp_path_factory.mktemp("ckpt")
    (path / "meta.json").write_bytes(raw)
    with pytest.raises(ValueError) as info:
        read_meta(path)
    assert str(path / "meta.json") in str(info.value)
