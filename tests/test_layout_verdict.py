"""One verdict on whether a model's dimensions fit a layout, and everybody agrees with it.

``ParallelConfig.misfit`` / ``check_model`` judge a :class:`~plait.config.ModelShape`. For a table
of (dimensions, layout) cases this checks that
- the verdict is the expected one (None: fits; else the broken rule, worded as a fix);
- the planner (``plait.plan.check_layout``, ``candidate_layouts``) accepts exactly what the verdict
  accepts, with the verdict's words when it refuses;
- the runtime does what the verdict says, on gloo ranks: cases that fit run and compute what one
  process computes (float64; a Llama with 12 heads and 3 KV heads at tp=4 against transformers,
  its gradients and its greedy tokens through the serving KV cache included; plait's GPT with a
  prime vocabulary at tp=4, with sequence parallelism, and with uneven pipeline stages at pp=2 x tp=2),
  and cases that do not are refused with the verdict's own message before any communication;
- which heads a rank holds (``plait.heads``) is what attention needs on every rank.
"""
from __future__ import annotations

import pytest
import torch

from fresh_python import run_fresh
from plait.config import ModelShape, ParallelConfig
from plait.heads import HeadLayout
from plait.launch import run_ranks


def _shape(layers=4, heads=8, kv=None, ffn=32, vocab=37, seq=8) -> ModelShape:
    return ModelShape(num_layers=layers, num_heads=heads, num_kv_heads=kv, ffn_hidden=ffn, vocab_size=vocab,
                      seq_len=seq)


def _layout(dp=1, pp=1, tp=1, v=1, sp=False) -> ParallelConfig:
    return ParallelConfig(dp=dp, pp=pp, tp=tp, num_virtual=v, schedule="interleaved" if v > 1 else "1f1b",
                          sequence_parallel=sp)


# (name, shape, layout, None when it fits, else a fragment of the reason)
CASES = [
    ("12 heads, 3 KV heads, tp=4: one KV head per query head", _shape(heads=12, kv=3), _layout(tp=4), None),
    ("8 heads, 2 KV heads, tp=4: KV heads replicated", _shape(heads=8, kv=2), _layout(tp=4), None),
    ("MQA at tp=4", _shape(heads=4, kv=1), _layout(tp=4), None),
    ("8 heads, 4 KV heads, tp=2: KV heads split", _shape(heads=8, kv=4), _layout(dp=2, tp=2), None),
    ("prime vocabulary at tp=4: padded", _shape(vocab=37), _layout(tp=4), None),
    ("6 heads at tp=4", _shape(heads=6, ffn=48), _layout(tp=4), "num_heads=6 is not divisible by tp=4"),
    ("FFN 50 at tp=4", _shape(ffn=50), _layout(tp=4), "ffn_hidden=50 is not divisible by tp=4"),
    ("vocabulary 3 at tp=4", _shape(vocab=3), _layout(tp=4), "vocab_size=3 is too small for tp=4"),
    ("vocabulary 10 at tp=6: the last rank pads only", _shape(heads=12, ffn=36, vocab=10), _layout(tp=6),
     "vocab_size=10 is too small for tp=6"),
    ("vocabulary 10 at tp=4 fits", _shape(heads=12, ffn=36, vocab=10), _layout(tp=4), None),
    ("3 layers at pp=2: uneven stages", _shape(layers=3), _layout(pp=2), None),
    ("1 layer at pp=2", _shape(layers=1), _layout(pp=2), "num_layers=1 is fewer than pp x virtual stages = 2 x 1"),
    ("4 layers at pp=2 x 3 virtual", _shape(layers=4), _layout(pp=2, v=3), "fewer than pp x virtual stages = 2 x 3"),
    ("6 layers at pp=2 x 3 virtual", _shape(layers=6), _layout(pp=2, v=3), None),
    ("SP, sequence 6 at tp=2", _shape(seq=6), _layout(tp=2, sp=True), None),
    ("SP, sequence 5 at tp=2", _shape(seq=5), _layout(tp=2, sp=True),
     "sequence_parallel needs the sequence length 5 divisible by tp=2"),
    ("sequence 5 at tp=2 without SP", _shape(seq=5), _layout(tp=2), None),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("name,shape,layout,expected", CASES, ids=IDS)
def test_the_verdict(name, shape, layout, expected):
    reason = layout.misfit(shape)
    if expected is None:
        assert reason is None, reason
        layout.check_model(shape)
    else:
        assert reason is not None and expected in reason, reason
        with pytest.raises(ValueError) as info:
            layout.check_model(shape)
        assert str(info.value) == reason


def test_inconsistent_heads_and_unknown_dims():
    reason = _layout(tp=1).misfit(_shape(heads=12, kv=5))
    assert reason.startswith("num_kv_heads=5 must divide num_heads=12")
    assert _layout(tp=4).misfit(ModelShape(num_layers=2, num_heads=4)) is None   # unknown dims: not judged
    with pytest.raises(ValueError, match="ModelShape.ffn_hidden must be a positive int"):
        ModelShape(num_layers=2, num_heads=4, ffn_hidden=0)
    with pytest.raises(ValueError, match="takes a plait.config.ModelShape"):
        _layout().check_model({"num_layers": 2})


def _planner_inputs(shape: ModelShape, layout: ParallelConfig):
    from plait.plan import JobSpec, Layout, ModelSpec, hardware

    model = ModelSpec("case", shape.num_layers, 4 * shape.num_heads, shape.num_heads, shape.ffn_hidden,
                      shape.vocab_size, shape.seq_len, num_kv_heads=shape.num_kv_heads)
    job = JobSpec(global_batch=4 * layout.dp * layout.pp, sequence_parallel=layout.sequence_parallel)
    plan_layout = Layout(dp=layout.dp, pp=layout.pp, tp=layout.tp, num_virtual=layout.num_virtual,
                         schedule=layout.schedule, sequence_parallel=layout.sequence_parallel)
    return model, hardware("h100", layout.world_size), job, plan_layout


@pytest.mark.parametrize("name,shape,layout,expected", CASES, ids=IDS)
def test_the_planner_agrees(name, shape, layout, expected):
    from plait.plan import check_layout
    from plait.plan.search import candidate_layouts

    model, cluster, job, plan_layout = _planner_inputs(shape, layout)
    reason = layout.misfit(shape)
    if reason is None:
        check_layout(model, cluster, job, plan_layout, allow_uneven=True)
    else:
        with pytest.raises(ValueError) as info:
            check_layout(model, cluster, job, plan_layout, allow_uneven=True)
        assert str(info.value).endswith(reason)
    if layout.pp == 1 and layout.dp == 1:   # the search offers this tp exactly when the verdict allows it
        offered = {c.tp for c in candidate_layouts(model, cluster, job, allow_uneven=True)}
        assert (layout.tp in offered) == (reason is None), offered


def test_the_planner_counts_the_kv_heads_the_runtime_holds():
    """12 heads, 3 KV heads: at tp=2 a rank's 6 query heads use KV heads 0,0,0,0,1,1, which attention cannot
    repeat evenly, so it holds one KV head per query head (6), as the runtime does."""
    from plait.plan import ModelSpec

    model = ModelSpec("gqa", 2, 48, 12, 32, 37, 8, num_kv_heads=3)
    assert [model.kv_heads_per_rank(tp) for tp in (1, 2, 3, 4, 6, 12)] == [3, 6, 1, 3, 1, 1]


@pytest.mark.parametrize("heads,kv", [(h, k) for h in (1, 2, 4, 6, 8, 12, 16, 24) for k in range(1, h + 1)
                                      if h % k == 0])
def test_each_rank_holds_the_kv_heads_its_query_heads_use(heads, kv):
    """Attention on a rank repeats each local KV head kv_groups times: local query head i must meet KV head
    q // (heads / kv). Every rank holds equally many KV heads (so shards gather), and replication is flagged."""
    group = heads // kv
    for tp in (t for t in range(1, heads + 1) if heads % t == 0):
        layouts = [HeadLayout(heads, kv, 2, tp, r) for r in range(tp)]
        assert len({len(h.kv_heads) for h in layouts}) == 1
        for h in layouts:
            assert len(h.q_heads) % len(h.kv_heads) == 0
            assert [h.kv_heads[i // h.kv_groups] for i in range(len(h.q_heads))] == [q // group for q in h.q_heads]
        held = [k for h in layouts for k in h.kv_heads]
        assert sorted(set(held)) == list(range(kv))
        assert layouts[0].replicated_kv == (len(held) > kv)


# ----------------------------------------------------------------------------- the runtime

def _llama_config(**dims):
    import transformers

    values = dict(vocab_size=37, hidden_size=48, intermediate_size=32, num_hidden_layers=2, num_attention_heads=12,
                  num_key_value_heads=3, max_position_embeddings=64, eos_token_id=1)
    return transformers.LlamaConfig(**{**values, **dims})


def _refusal(model, mesh) -> str:
    """parallelize's refusal of ``model`` on ``mesh``, after which the group still works."""
    import plait

    with pytest.raises(ValueError) as info:
        plait.parallelize(model, mesh)
    assert mesh.tp_comm.all_reduce(torch.ones(1)).item() == mesh.tp
    return str(info.value)


def _tp4_rank(rank: int, world: int, directory: str) -> dict:
    import transformers

    import plait
    from hf_models import load_reference, relative_error
    from plait.models import GPT, GPTConfig, init_parameters
    from plait.parallel.apply import model_shape
    from plait.serve import Engine, SamplingParams
    from plait.serve.worker import local_kv_heads

    torch.set_default_dtype(torch.float64)
    mesh = plait.init_mesh(tp=world)
    out = {}
    try:
        # 12 heads, 3 KV heads: the verdict lets it run; logits, gradients and greedy tokens are transformers'
        ref = load_reference(directory)
        out["llama_verdict"] = mesh.config.misfit(model_shape(ref, plait.plans.for_model(ref)))
        model = plait.from_pretrained(directory, mesh, dtype=torch.float64)
        attn = model.stages[0].get_submodule("model.layers.0.self_attn")
        out["local_heads"] = (attn.k_proj.weight.shape[0] // 4, attn.num_key_value_groups, local_kv_heads(model))
        gen = torch.Generator().manual_seed(5)
        ids, targets = torch.randint(0, 37, (2, 7), generator=gen), torch.randint(0, 37, (2, 7), generator=gen)
        want = ref(ids).logits
        out["logits"] = relative_error(model.logits(ids), want)
        model.pipeline("1f1b", num_microbatches=1).train_step(ids, targets)
        grads = model.full_state_dict(grads=True)
        torch.nn.functional.cross_entropy(want.reshape(-1, 37), targets.reshape(-1)).backward()
        out["grads"] = max(relative_error(grads[n], p.grad) for n, p in ref.named_parameters())
        done = Engine(model.eval(), max_batch=2).generate([[2, 5, 7, 9]], [SamplingParams(max_tokens=6)])
        out["tokens"] = done[0].token_ids

        # plait's GPT with a prime vocabulary (padded): once refused by GPTConfig, runs and is exact
        cfg = GPTConfig(vocab_size=37, num_layers=2, hidden=32, num_heads=4, seq_len=8, dtype=torch.float64)
        single, split = GPT(cfg), GPT(cfg)
        init_parameters(single, 3)
        init_parameters(split, 3)
        gpt_ids = torch.randint(0, 37, (2, 8), generator=gen)
        out["gpt_verdict"] = mesh.config.misfit(cfg.shape())
        out["gpt_logits"] = relative_error(plait.parallelize(split, mesh).logits(gpt_ids), single(gpt_ids))
        # under sequence parallelism a sequence of 6 does not split over 4 ranks: both refuse it
        sp = ParallelConfig(tp=world, sequence_parallel=True)
        out["sp_verdict"] = sp.misfit(cfg.shape(seq_len=6))
        sp_model = GPT(cfg)
        init_parameters(sp_model, 3)
        sp_model = plait.parallelize(sp_model, mesh, config=sp)
        out["sp_logits"] = relative_error(sp_model.logits(gpt_ids), single(gpt_ids))
        with pytest.raises(ValueError) as info:
            sp_model.logits(gpt_ids[:, :6])
        out["sp_runtime"] = str(info.value)

        # what the verdict refuses, parallelize refuses with the verdict's words, before communicating
        refused = {"heads": _llama_config(num_attention_heads=6, num_key_value_heads=3),
                   "ffn": _llama_config(intermediate_size=50),
                   "vocab": _llama_config(vocab_size=3, eos_token_id=0)}
        out["refused"] = {}
        for case, config in refused.items():
            bad = transformers.AutoModelForCausalLM.from_config(config)
            verdict = mesh.config.misfit(model_shape(bad, plait.plans.for_model(bad)))
            out["refused"][case] = (verdict, _refusal(bad, mesh))
    finally:
        plait.destroy_mesh()
    return out


@pytest.fixture(scope="module")
def gqa_12_3(tmp_path_factory):
    """A Llama with 12 query heads and 3 KV heads (lively float64 weights, so greedy tokens vary)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    directory = tmp_path_factory.mktemp("gqa") / "llama-12-3"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_llama_config()).double()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3) if param.dim() >= 2 else param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(str(directory))
    return str(directory)


def test_runtime_at_tp4_does_what_the_verdict_says(gqa_12_3):
    from serve_models import reference_greedy

    results = run_ranks(_tp4_rank, 4, gqa_12_3, timeout=400)
    tokens = reference_greedy(gqa_12_3, [2, 5, 7, 9], 6)
    for rank, r in enumerate(results):
        assert r["llama_verdict"] is None and r["gpt_verdict"] is None
        assert r["local_heads"] == (3, 1, 3), f"rank {rank}: one KV head per query head, 3 of each"
        assert r["logits"] < 1e-12 and r["grads"] < 1e-10, f"rank {rank}: {r['logits']:.3g} {r['grads']:.3g}"
        assert r["tokens"] == tokens, f"rank {rank}: {r['tokens']} != transformers' {tokens}"
        assert r["gpt_logits"] < 1e-12 and r["sp_logits"] < 1e-12, f"rank {rank}: {r}"
        assert all("sequence length 6 divisible by tp=4" in r[k] for k in ("sp_verdict", "sp_runtime")), r
        for case, (verdict, refusal) in r["refused"].items():
            assert verdict is not None and refusal == verdict, (case, verdict, refusal)
    assert "num_heads=6 is not divisible by tp=4" in results[0]["refused"]["heads"][0]
    assert "ffn_hidden=50 is not divisible by tp=4" in results[0]["refused"]["ffn"][0]
    assert "vocab_size=3 is too small for tp=4" in results[0]["refused"]["vocab"][0]


def _pp2_tp2_rank(rank: int, world: int) -> dict:
    import plait
    from hf_models import relative_error
    from plait.models import GPT, GPTConfig, init_parameters

    torch.set_default_dtype(torch.float64)
    config = ParallelConfig(pp=2, tp=2, sequence_parallel=True)
    mesh = plait.init_mesh(config)
    out = {}
    try:
        # 3 layers over 2 stages (uneven), sequence parallel over a sequence of 6: fits, and is exact
        cfg = GPTConfig(vocab_size=37, num_layers=3, hidden=32, num_heads=4, seq_len=8, dtype=torch.float64)
        single, split = GPT(cfg), GPT(cfg)
        init_parameters(single, 4)
        init_parameters(split, 4)
        ids = torch.randint(0, 37, (2, 6), generator=torch.Generator().manual_seed(2))
        out["verdict"] = config.misfit(cfg.shape(seq_len=6))
        model = plait.parallelize(split, mesh, config=config)
        out["logits"] = relative_error(model.logits(ids), single(ids))
        # a sequence of 5 under SP at tp=2: refused on every rank before any collective (no stage waits)
        with pytest.raises(ValueError) as info:
            model.logits(ids[:, :5])
        out["sp_logits"] = str(info.value)
        # one layer cannot make two stages
        one = GPT(GPTConfig(vocab_size=37, num_layers=1, hidden=32, num_heads=4, seq_len=8, dtype=torch.float64))
        out["layers_verdict"] = config.misfit(one.config.shape())
        with pytest.raises(ValueError) as info:
            plait.parallelize(one, mesh, config=config)
        out["layers_runtime"] = str(info.value)
    finally:
        plait.destroy_mesh()
    return out


def test_runtime_at_pp2_tp2_does_what_the_verdict_says():
    for rank, r in enumerate(run_ranks(_pp2_tp2_rank, 4, timeout=300)):
        assert r["verdict"] is None and r["logits"] < 1e-12, f"rank {rank}: {r}"
        assert "sequence length 5 divisible by tp=2" in r["sp_logits"], f"rank {rank}: {r}"
        assert "num_layers=1 is fewer than pp x virtual stages = 2 x 1" in r["layers_verdict"]
        assert r["layers_runtime"] == r["layers_verdict"], f"rank {rank}: {r}"


def test_plan_imports_no_torch():
    code = ("import sys, plait.plan, plait.heads; from plait.plan import search, model_preset, hardware, JobSpec; "
            "search(model=model_preset('llama3-8b'), cluster=hardware('h100', 8), job=JobSpec(global_batch=64)); "
            "sys.exit('torch imported' if 'torch' in sys.modules else 0)")
    run_fresh(code)
