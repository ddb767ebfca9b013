"""Checkpoints as they ship compute in plait what transformers computes, on any layout; dropout is exact.

- Every config field of each supported transformers config class is declared by its family
  (honoured or refused) or is bookkeeping, and docs/model-fields.md is the generated table.
- Refused fields fail before any weights are read or any process group exists.
- tests/fidelity_models.py's variants (default field values, GPT-2's 0.1 dropouts included, plus
  rotary scaling of every kind, biases, head_dim != hidden/heads, windows, soft-caps), float64:
  ``logits`` (in eval *and* train mode) and greedy tokens of the serving engine equal
  transformers' at (tp, pp) in (1, 1), (2, 1), (2, 2); also a bfloat16 checkpoint in several files.
- Training with dropout on (GPT-2's shipped 0.1, and attention dropout 0.1) with ``plait train``
  gives the one-process losses to 1e-9 at (dp, pp, tp) in (2, 2, 2), (1, 2, 2), (2, 1, 2), also
  when resumed on another layout, and parameters replicated over TP stay bitwise equal across TP
  ranks.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fidelity_models import VARIANTS, VOCAB, reference, reference_greedy, save_variant, variant_config
from plait.launch import run_ranks

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

ROOT = Path(__file__).resolve().parents[1]
CONFIG_CLASSES = ("LlamaConfig", "MistralConfig", "Qwen2Config", "Qwen3Config", "GPT2Config", "Gemma2Config")


# ----------------------------------------------------------------------------- fields
@pytest.mark.parametrize("class_name", CONFIG_CLASSES)
def test_every_config_field_is_declared(class_name):
    import transformers as T

    from plait.parallel.families import BY_MODEL_TYPE, NOT_MATH

    config = getattr(T, class_name)()
    family = BY_MODEL_TYPE[config.model_type]
    declared = {field.name for field in family.fields}
    unknown = sorted(set(config.to_dict()) - declared - NOT_MATH)
    assert not unknown, (f"{class_name} fields {unknown} are neither declared by the {family.name!r} family "
                         f"(honoured or refused) nor bookkeeping")


def test_fields_doc_is_current():
    from plait.parallel.families import fields_markdown

    doc = (ROOT / "docs" / "model-fields.md").read_text()
    assert doc == fields_markdown() + "\n", "regenerate: python -m plait.parallel.families > docs/model-fields.md"


REFUSED = [("gpt2", {"add_cross_attention": True}, "add_cross_attention=True"),
           ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention=True")]


def _refused_dir(tmp_path, name, fields) -> str:
    """A checkpoint directory holding only the config: the refusal must come before any weights are read."""
    config = variant_config(name)
    for key, value in fields.items():
        setattr(config, key, value)
    config.save_pretrained(str(tmp_path))
    return str(tmp_path)


@pytest.mark.parametrize("name,fields,message", REFUSED)
def test_refused_fields_fail_before_any_process_group(tmp_path, name, fields, message):
    import torch.distributed as dist

    import plait

    directory = _refused_dir(tmp_path, name, fields)
    with pytest.raises(ValueError, match=message):
        plait.from_pretrained(directory, mesh=None)
    assert not dist.is_initialized()
    for command in (["generate", "--model", directory, "--prompt-ids", "1,2"],
                    ["train", "--model", directory, "--data", str(tmp_path / "missing.bin")]):
        out = subprocess.run([sys.executable, "-m", "plait", *command], capture_output=True, text=True,
                             timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert out.returncode == 2 and message in out.stderr, (command, out.stderr)


def _unowned_config(kind: str):
    """A tiny config of a Llama-like model type no plait family owns (each carries a field Llama lacks)."""
    import transformers as T

    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2)
    return {"granite": lambda: T.GraniteConfig(**small, embedding_multiplier=12.0, logits_scaling=8.0),
            "cohere": lambda: T.CohereConfig(**small, logit_scale=0.0625),
            "gemma": lambda: T.GemmaConfig(**small, head_dim=8)}[kind]()


@pytest.mark.parametrize("kind", ["granite", "cohere", "gemma"])
def test_model_types_no_family_owns_are_refused_by_name(tmp_path, kind):
    """They have a transformers TP plan, but plait would not see their own fields: refused before any process
    group, unless the caller passes a plan (then only that plan's family's fields are checked)."""
    import torch.distributed as dist
    import transformers as T

    import plait
    from plait.parallel import check_config

    config = _unowned_config(kind)
    config.save_pretrained(str(tmp_path))
    message = f"no model family for model_type='{kind}'"
    with pytest.raises(ValueError, match=message):
        plait.from_pretrained(str(tmp_path), mesh=None)
    assert not dist.is_initialized()
    out = subprocess.run([sys.executable, "-m", "plait", "generate", "--model", str(tmp_path), "--prompt-ids", "1,2"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 2 and message in out.stderr, out.stderr
    check_config(config, plan_family="llama")          # a plan the caller chose: its family's fields only
    model = T.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=message):
        plait.parallelize(model, mesh=None)


# ----------------------------------------------------------------------------- inference
PROMPT = [3, 5, 7, 11]


def _new_tokens(config) -> int:
    context = getattr(config, "max_position_embeddings", None) or config.n_positions
    return min(10, context - len(PROMPT))


def _check_variants(rank: int, world: int, pp: int, tp: int, dirs: dict) -> dict:
    import plait
    from plait.serve.engine import Engine
    from plait.serve.sampling import SamplingParams
    from plait.serve.worker import context_length

    plait.init_mesh(pp=pp, tp=tp)
    out = {}
    for name, (directory, variant) in dirs.items():
        tol, seq = VARIANTS[variant]
        model = plait.from_pretrained(directory, plait.current_mesh(), dtype=torch.float64)
        ref = reference(directory)
        ids = torch.randint(0, VOCAB, (3, seq), generator=torch.Generator().manual_seed(len(name)))
        want = ref(ids).logits
        scale = want.abs().max()
        eval_mode = not model.training
        err = ((model.logits(ids) - want).abs().max() / scale).item()
        model.train()                                         # logits and serving run in eval mode anyway
        err_train = ((model.logits(ids) - want).abs().max() / scale).item()
        n = _new_tokens(ref.config)
        engine = Engine(model, max_batch=2)
        got = engine.generate([PROMPT], [SamplingParams(max_tokens=n, ignore_eos=True)])[0].token_ids
        # prompts of 11 and 7 tokens sharing a prefix (past 8 positions longrope switches factors and dynamic
        # rescales, so their prefix's keys differ), served together in blocks of 4 and chunks of a 5-token step
        # budget (run as one-token rows): each as transformers generates it
        context = context_length(ref.config)
        longer = [(3 + 5 * i) % VOCAB for i in range(min(11, context - 4))]
        prompts = [longer, longer[:7]]
        new = min(4, context - len(longer))
        chunked = Engine(model, max_batch=2, max_step_tokens=5, block_size=4)
        results = chunked.generate(prompts, [SamplingParams(max_tokens=new, ignore_eos=True, logprobs=0)] * 2)
        # a fresh reference per prompt: dynamic rotary modules keep state from earlier calls
        first_logprobs = [torch.log_softmax(reference(directory)(torch.tensor([p])).logits[0, -1], -1)[r.token_ids[0]]
                          .item() for p, r in zip(prompts, results)]
        out[name] = dict(eval_mode=eval_mode, err=err, err_train=err_train, tol=tol, tokens=got,
                         want=reference_greedy(ref, PROMPT, n), served=[r.token_ids for r in results],
                         served_want=[reference_greedy(ref, p, new) for p in prompts],
                         logprob_err=max(abs(r.logprobs[0] - want) for r, want in zip(results, first_logprobs)))
    plait.destroy_mesh()
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    dirs = {name: (save_variant(name, root / name, seed=i), name) for i, name in enumerate(VARIANTS)}
    # a bfloat16 checkpoint in several files (an index), read into float64 by both sides
    dirs["llama_llama3_bf16_sharded"] = (save_variant("llama_llama3", root / "bf16", seed=1, dtype=torch.bfloat16,
                                                      max_shard_size="20KB"), "llama_llama3")
    return dirs


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (2, 2)])
def test_checkpoints_as_shipped_match_transformers(checkpoints, tp, pp):
    results = run_ranks(_check_variants, tp * pp, pp, tp, checkpoints, timeout=900)
    for rank, per_variant in enumerate(results):
        for name, r in per_variant.items():
            where = f"{name} tp={tp} pp={pp} rank {rank}"
            assert r["eval_mode"], f"{where}: from_pretrained returned a model in training mode"
            assert r["err"] <= r["tol"], f"{where}: logits differ from transformers by {r['err']:.3g}"
            assert r["err_train"] <= r["tol"], f"{where}: logits in train mode differ by {r['err_train']:.3g}"
            assert r["tokens"] == r["want"], f"{where}: greedy tokens {r['tokens']} != transformers' {r['want']}"
            assert r["served"] == r["served_want"], f"{where}: chunked prefill {r['served']} != {r['served_want']}"
            assert r["logprob_err"] <= 1e3 * r["tol"], f"{where}: first token's logprob off by {r['logprob_err']:.3g}"


def _loaded_dtype(rank: int, world: int, directory: str) -> str:
    import plait

    plait.init_mesh(tp=world)
    model = plait.from_pretrained(directory, plait.current_mesh())
    dtype = str(model.dtype)
    plait.destroy_mesh()
    return dtype


def test_bfloat16_checkpoint_loads_in_its_config_dtype(checkpoints):
    config = json.loads((Path(checkpoints["llama_llama3_bf16_sharded"][0]) / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert (Path(checkpoints["llama_llama3_bf16_sharded"][0]) / "model.safetensors.index.json").is_file()

    assert run_ranks(_loaded_dtype, 2, checkpoints["llama_llama3_bf16_sharded"][0], timeout=300) == ["torch.bfloat16"] * 2


# ----------------------------------------------------------------------------- training with dropout
SEQ, BATCH, STEPS, LR = 8, 4, 5, 3e-3
DROPOUT_VARIANTS = ("gpt2", "qwen2_window")      # resid/embd/attn dropout 0.1; attention dropout 0.1


def _job(directory: str, data: str, dp=1, pp=1, tp=1) -> dict:
    return dict(model=directory, data=data, eval_data=data, eval_batches=1, seq=SEQ, global_batch=BATCH,
                steps=STEPS, lr=LR, dtype="float64", weight_decay=0.0, lr_schedule="constant", clip_grad=0.0,
                microbatches=2 if pp > 1 else 1, dp=dp, pp=pp, tp=tp, seed=11)


def _replicas_after_training(directory: str, data: str, dp: int, pp: int, tp: int) -> list[str]:
    """Train ``STEPS`` steps with dropout through the model's own pipeline engine and plait's optimizer;
    the names of TP-replicated parameters that differ between this rank and TP rank 0 (must be none)."""
    import plait
    from plait.train import TrainJob
    from plait.train.optim import Optimizer

    mesh = plait.init_mesh(dp=dp, pp=pp, tp=tp)
    model = plait.from_pretrained(directory, mesh, dtype=torch.float64).train()
    job = TrainJob.from_dict(_job(directory, data, dp, pp, tp))
    optimizer = Optimizer(model, job)
    engine = model.pipeline("1f1b", num_microbatches=job.microbatches)
    rows = BATCH // dp
    for step in range(STEPS):
        batch = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(step))
        mine = batch[mesh.dp_rank * rows:(mesh.dp_rank + 1) * rows]
        optimizer.start_step(job.microbatches)
        engine.train_step(mine[:, :-1], mine[:, 1:])
        optimizer.finish()
        optimizer.step()
        optimizer.zero_grad()
    differ = []
    for name, param in model.named_model_parameters():
        if model.spec_of(name).dim is None:
            copies = mesh.tp_comm.all_gather(param.detach().reshape(1, -1).contiguous(), dim=0)
            if not all(torch.equal(copies[0], copy) for copy in copies):
                differ.append(name)
    return differ


def _train_layout(rank: int, world: int, dirs: dict, data: str, layout: tuple, resume_on=None,
                  save_root=None) -> dict:
    import torch.distributed as dist

    import plait
    from plait.train import TrainJob, train_rank

    dp, pp, tp = layout
    dist.init_process_group("gloo")
    out = {}
    for name, directory in dirs.items():
        summary = train_rank(TrainJob.from_dict(_job(directory, data, dp, pp, tp)), show=False)
        out[name] = dict(losses=[r.loss for r in summary.records], eval=summary.eval_loss,
                         replicas_differ=_replicas_after_training(directory, data, dp, pp, tp))
        if resume_on is not None:        # 3 steps here, the rest resumed on another layout of as many ranks
            save = f"{save_root}/{name}"
            train_rank(TrainJob.from_dict({**_job(directory, data, dp, pp, tp), "steps": 3, "save": save}),
                       show=False)
            resumed = train_rank(TrainJob.from_dict({**_job(directory, data, *resume_on), "save": save,
                                                     "resume": "latest"}), show=False)
            out[name]["resumed"] = [r.loss for r in resumed.records]
    plait.destroy_mesh()      # the last job's mesh, and the process group
    return out


@pytest.fixture(scope="module")
def dropout_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dropout")
    dirs = {name: save_variant(name, root / name, seed=20 + i) for i, name in enumerate(DROPOUT_VARIANTS)}
    tokens = np.random.default_rng(5).integers(0, VOCAB, 9 * SEQ + 1).astype(np.uint16)
    tokens.tofile(root / "data.bin")
    one = run_ranks(_train_layout, 1, dirs, str(root / "data.bin"), (1, 1, 1), timeout=600)[0]
    return dirs, str(root / "data.bin"), one


def test_dropout_is_on_in_training_and_off_in_evaluation(dropout_files):
    """The one-process run really drops out (its first loss is not transformers' eval-mode loss) and its
    evaluation does not (the evaluation loss of the trained model is deterministic across layouts below)."""
    dirs, data, one = dropout_files
    tokens = torch.from_numpy(np.fromfile(data, dtype=np.uint16).astype(np.int64))
    for name, directory in dirs.items():
        rows = torch.stack([tokens[i * SEQ:i * SEQ + SEQ + 1] for i in range(BATCH)])
        logits = reference(directory)(rows[:, :-1]).logits
        eval_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), rows[:, 1:].reshape(-1)).item()
        assert abs(one[name]["losses"][0] - eval_loss) > 1e-6 * abs(eval_loss), f"{name}: dropout did not act"
        assert one[name]["replicas_differ"] == []


@pytest.mark.parametrize("layout,resume_on", [((2, 2, 2), None), ((1, 2, 2), None), ((2, 1, 2), (1, 2, 2))],
                         ids=["dp2_pp2_tp2", "dp1_pp2_tp2", "dp2_pp1_tp2_resumed_on_dp1_pp2_tp2"])
def test_dropout_training_equals_one_process(dropout_files, tmp_path, layout, resume_on):
    dirs, data, one = dropout_files
    dp, pp, tp = layout
    results = run_ranks(_train_layout, dp * pp * tp, dirs, data, layout, resume_on, str(tmp_path), timeout=900)
    for rank, per_model in enumerate(results):
        for name, r in per_model.items():
            where = f"{name} (dp, pp, tp)={layout} rank {rank}"
            want = one[name]["losses"]
            assert len(r["losses"]) == len(want), where
            for step, (got, exp) in enumerate(zip(r["losses"], want)):
                assert abs(got - exp) <= 1e-9 * abs(exp), f"{where}: step {step + 1} loss {got!r} != {exp!r}"
            assert abs(r["eval"] - one[name]["eval"]) <= 1e-9 * abs(one[name]["eval"]), f"{where}: eval loss"
            assert r["replicas_differ"] == [], f"{where}: TP replicas diverged: {r['replicas_differ']}"
            if resume_on is not None:
                for step, (got, exp) in enumerate(zip(r["resumed"], want[3:]), start=4):
                    assert abs(got - exp) <= 1e-9 * abs(exp), f"{where}: resumed step {step} loss {got!r} != {exp!r}"
                assert len(r["resumed"]) == STEPS - 3, where
