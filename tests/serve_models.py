"""Tiny models for the serving tests: tests/hf_models.py's configs with livelier weights and a tokenizer.

Weights drawn with std 0.3 (transformers' 0.02 makes a tiny random model repeat one token),
so greedy decoding walks through many different tokens and a wrong cache entry shows. The
tokenizer is a WordLevel model trained with ``tokenizers`` on a few sentences, saved as a
``PreTrainedTokenizerFast`` with a chat template, and fits the models' 37-token vocabulary.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from typing import Iterator

import torch

from hf_models import VOCAB, liven, tiny_config

SENTENCES = ["the cat sat on the mat", "a dog ran to the park and back", "we like red and blue boats",
             "one two three four five six", "the sun is warm today", "my friend reads old books"]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def save_tokenizer(directory) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(vocab_size=VOCAB,
                                                                 special_tokens=["<unk>", "<eos>"]))
    assert tok.get_vocab_size() <= VOCAB
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(directory))


def save_model(kind: str, directory, seed: int = 0, tokenizer: bool = True) -> str:
    """A tiny ``kind`` model (see hf_models.FAMILIES) with lively weights, EOS id 1, in ``directory``."""
    import transformers as T

    torch.manual_seed(seed)
    config = tiny_config(kind)
    config.eos_token_id = 1
    model = T.AutoModelForCausalLM.from_config(config).double()
    liven(model)
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 1
    model.save_pretrained(str(directory))
    if tokenizer:
        save_tokenizer(directory)
    return str(directory)


def reference_greedy(directory, prompt: list[int], max_new_tokens: int, stop_at_eos: bool = True) -> list[int]:
    """transformers' greedy ``generate`` on ``prompt`` alone, new tokens only (ending at EOS if it comes, unless
    ``stop_at_eos`` is False: then every token is the argmax of transformers' logits, EOS or not)."""
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float64)
    if not stop_at_eos:
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(max_new_tokens):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        return ids[len(prompt):]
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


@contextlib.contextmanager
def serving(directory: str, *args: str, startup_s: float = 300) -> Iterator[dict]:
    """``plait serve --model directory *args`` on a free port of 127.0.0.1 until ``/health`` answers 200;
    yields ``{"url", "proc"}`` and kills the server afterwards if it still runs."""
    import httpx

    from plait.launch import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "plait", "serve", "--model", directory, "--port", str(port),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_s
    try:
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"the server did not come up:\n{proc.stdout.read()}")
            time.sleep(0.5)
        yield dict(url=url, proc=proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
