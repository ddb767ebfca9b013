"""plait.serve on one CUDA GPU (tp=1), float64, against transformers: the same engine as on CPU, its step
messages on a gloo group and its tensors (cache, hidden states, logits) on the GPU.

- the engine in-process: greedy tokens of Llama (GQA) and GPT-2 equal transformers' ``generate``, with
  prompts sharing a prefix (read from the prefix cache), chunked prefill beside decodes, and log-probabilities
  equal to ``log_softmax`` of transformers' logits;
- ``plait serve`` on the GPU through HTTP: greedy tokens equal transformers'.

Run by ``make gpu-check`` as its own stage (serve-gpu), not by the pytest-gpu stage.
"""
from __future__ import annotations

import pytest
import torch

from plait.launch import run_ranks
from serve_models import reference_greedy, save_model, serving

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU visible to torch")]
pytest.importorskip("transformers")

SYSTEM = [5, 9, 14, 3, 22, 8, 30, 17, 11, 4]
PROMPTS = [SYSTEM + [2, 6], SYSTEM + [7], SYSTEM[:6] + [19, 20, 21], [12, 13, 15]]
NEW = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-gpu")
    return {kind: save_model(kind, root / kind, seed=3) for kind in ("llama", "gpt2")}


def _engine_on_gpu(rank: int, world: int, models: dict) -> dict:
    import plait
    from plait.serve import Engine, SamplingParams

    mesh = plait.init_mesh()
    assert mesh.device.type == "cuda", mesh.device
    out = {}
    for kind, directory in models.items():
        model = plait.from_pretrained(directory, mesh, dtype=torch.float64)
        engine = Engine(model, max_batch=3, block_size=4, max_step_tokens=5)
        assert engine.worker.cache.k.is_cuda
        done = engine.generate(PROMPTS, [SamplingParams(max_tokens=NEW, logprobs=2)] * len(PROMPTS),
                               arrivals=[0, 0, 2, 4])
        out[kind] = dict(tokens=[c.token_ids for c in done], logprobs=[c.logprobs for c in done],
                         hits=engine.scheduler.cache_hits)
    plait.destroy_mesh()
    return out


def test_engine_on_one_gpu_equals_transformers(models):
    import transformers as T

    [result] = run_ranks(_engine_on_gpu, 1, models, timeout=300)
    for kind, directory in models.items():
        want = [reference_greedy(directory, p, NEW) for p in PROMPTS]
        got = result[kind]
        assert got["tokens"] == want, f"{kind} on the GPU: {got['tokens']} != transformers' {want}"
        assert got["hits"] > 0, f"{kind}: nothing was read from the prefix cache"
        reference = T.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64)
        for prompt, tokens, logprobs in zip(PROMPTS, want, got["logprobs"]):
            with torch.no_grad():
                logits = reference(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
            expect = torch.log_softmax(logits, -1)[torch.arange(len(tokens)), tokens]
            torch.testing.assert_close(torch.tensor(logprobs, dtype=torch.float64), expect, rtol=0, atol=1e-9)


def test_plait_serve_on_one_gpu_equals_transformers(models):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    directory = models["llama"]
    with serving(directory, "--dtype", "float64", "--max-batch", "4", "--block-size", "4") as server:
        for prompt in PROMPTS:
            reply = httpx.post(server["url"] + "/v1/completions", timeout=120,
                               json={"model": directory, "prompt": prompt, "max_tokens": NEW, "temperature": 0})
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["token_ids"] == reference_greedy(directory, prompt, NEW)
        card = httpx.get(server["url"] + "/v1/models").json()["data"][0]
        assert card["plait"]["device"] == "cuda" and card["plait"]["dtype"] == "float64", card
