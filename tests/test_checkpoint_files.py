"""Damaged plait.train checkpoints: a missing, empty, truncated, garbage or foreign train_state.json or
safetensors file is a ValueError that names the file, raised by the check every rank runs before any
communication, never a JSONDecodeError, a KeyError or a TypeError from deep inside."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt_jobs import job_dict

pytest.importorskip("safetensors")

STATE = "train_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer/part-00000-of-00001.safetensors"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A valid checkpoint: one step of the tests' GPT in this process."""
    from plait.train import TrainJob, train_rank

    save = tmp_path_factory.mktemp("ckpt") / "save"
    summary = train_rank(TrainJob.from_dict(job_dict(steps=1, save=str(save))), show=False)
    return Path(summary.checkpoint)


def check(checkpoint: Path) -> dict:
    """What a resumed job checks first (plait.train.loop.train_rank): the checkpoint against the job."""
    from plait.train import TrainJob
    from plait.train.checkpoint import check_checkpoint
    from plait.train.loop import _fingerprint
    from plait.train.model import check_same_model, model_config, parameter_shapes

    job = TrainJob.from_dict(job_dict(steps=2, resume=str(checkpoint)))
    config = model_config(job)
    shapes, tied = parameter_shapes(config)
    state = check_checkpoint(checkpoint, shapes, _fingerprint(job), tied)
    check_same_model(checkpoint, state.get("model"), config)
    return state


def copy(good: Path, where: Path) -> Path:
    shutil.copytree(good, where / "ckpt")
    return where / "ckpt"


def test_valid_checkpoint_passes(good: Path) -> None:
    state = check(good)
    assert state["step"] == 1 and state["optimizer_keys"] == ["exp_avg", "exp_avg_sq"]


def _damage_state(path: Path, how: str) -> None:
    file = path / STATE
    text = file.read_text()
    document = json.loads(text)
    if how == "missing":
        file.unlink()
    elif how == "empty":
        file.write_text("")
    elif how == "truncated":
        file.write_text(text[: len(text) // 2])
    elif how == "garbage":
        file.write_bytes(b"\x80\x81\xfe\x00 not json")
    elif how == "list":
        file.write_text("[1, 2]")
    elif how == "format":
        file.write_text(json.dumps({**document, "format": 9}))
    else:   # a field of the wrong type: "field=json value"
        key, value = how.split("=", 1)
        file.write_text(json.dumps({**document, key: json.loads(value)}))


@pytest.mark.parametrize("how,fragment", [
    ("missing", "missing; .* is not a complete plait checkpoint"), ("empty", "truncated or corrupt"),
    ("truncated", "truncated or corrupt"), ("garbage", "truncated or corrupt"), ("list", "not a plait train state"),
    ("format", "checkpoint format 9, this plait reads format 1"), ('step="1"', "'step' must be a whole number"),
    ("adam_step=-1", "'adam_step' must be a number >= 0"), ('shapes={"w": "4x2"}', "'shapes' must be a mapping"),
    ("fingerprint=3", "'fingerprint' must be a mapping"), ("optimizer_keys=5", "'optimizer_keys' must be a list"),
    ('rng={"torch": "AAAA"}', "'rng' must be a mapping with the torch RNG state"), ("model=[1]", "'model' must be"),
])
def test_damaged_state_names_the_file(good: Path, tmp_path: Path, how: str, fragment: str) -> None:
    path = copy(good, tmp_path)
    _damage_state(path, how)
    with pytest.raises(ValueError, match=fragment) as info:
        check(path)
    assert str(path / STATE) in str(info.value)


def _damage_tensors(file: Path, how: str) -> None:
    from safetensors.torch import load_file, save_file

    data = file.read_bytes()
    if how == "missing":
        file.unlink()
    elif how == "empty":
        file.write_bytes(b"")
    elif how == "truncated":
        file.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        file.write_bytes(b"PK\x03\x04 this is not a safetensors file")
    else:
        tensors = load_file(str(file))
        name = sorted(tensors)[0]
        if how == "lacks a tensor":
            tensors.pop(name)
        else:   # "another shape"
            tensors[name] = tensors[name].reshape(-1)[:-1].clone()
        save_file(tensors, str(file), metadata={"format": "pt"})


@pytest.mark.parametrize("file", [MODEL_FILE, OPTIMIZER_FILE])
@pytest.mark.parametrize("how,fragment", [
    ("missing", r"no model\.safetensors|missing safetensors file"), ("empty", "not a readable safetensors file"),
    ("truncated", "not a readable safetensors file"), ("garbage", "not a readable safetensors file"),
    ("lacks a tensor", "is missing; the checkpoint is incomplete|names tensors its files do not hold"), ("another shape", "has shape .*, expected"),
])
def test_damaged_tensor_file_names_it(good: Path, tmp_path: Path, file: str, how: str, fragment: str) -> None:
    path = copy(good, tmp_path)
    _damage_tensors(path / file, how)
    with pytest.raises(ValueError, match=fragment) as info:
        check(path)
    assert str((path / file).parent) in str(info.value)


FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(file=st.sampled_from([MODEL_FILE, OPTIMIZER_FILE]), keep=st.floats(0, 1),
       flip=st.one_of(st.none(), st.integers(0, 10 ** 6)))
def test_any_cut_or_flipped_byte_of_a_tensor_file(good: Path, tmp_path_factory: pytest.TempPathFactory, file: str,
                                                  keep: float, flip) -> None:
    """A tensor file cut anywhere, or with one byte changed, passes the check (a changed value, which
    safetensors cannot tell) or is a ValueError naming it."""
    path = copy(good, tmp_path_factory.mktemp("fuzz"))
    data = bytearray((path / file).read_bytes())
    data = data[: int(len(data) * keep)] if keep < 1 else data
    if flip is not None and data:
        data[flip % len(data)] ^= 0xFF
    (path / file).write_bytes(bytes(data))
    try:
        check(path)
    except ValueError as exc:
        assert str(path / file) in str(exc)


KEYS = ["format", "step", "adam_step", "shapes", "fingerprint", "optimizer_keys", "rng", "torch", "model"]
JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5)),
                    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.sampled_from(KEYS), c, max_size=4)),
                    max_leaves=10)


@FUZZ
@given(raw=st.one_of(st.binary(max_size=80), st.text(max_size=80).map(str.encode),
                     JSON.map(lambda d: json.dumps(d).encode())))
def test_any_train_state(good: Path, tmp_path_factory: pytest.TempPathFactory, raw: bytes) -> None:
    path = copy(good, tmp_path_factory.mktemp("fuzz"))
    (path / STATE).write_bytes(raw)
    with pytest.raises(ValueError) as info:
        check(path)
    assert str(path / STATE) in str(info.value)


@FUZZ
@given(key=st.sampled_from(KEYS[:-2] + ["model"]), value=JSON)
def test_any_value_of_a_train_state_field(good: Path, tmp_path_factory: pytest.TempPathFactory, key: str,
                                          value) -> None:
    """One field of a valid train_state.json replaced by any JSON value: the checks pass (a value of the
    right kind) or end in a ValueError naming the checkpoint, never another exception."""
    path = copy(good, tmp_path_factory.mktemp("fuzz"))
    document = json.loads((path / STATE).read_text())
    (path / STATE).write_text(json.dumps({**document, key: value}))
    try:
        check(path)
    except ValueError as exc:
        assert str(path) in str(exc)
