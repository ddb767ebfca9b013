"""OpenAI's response shapes for the choices of one request, whole or as server-sent event chunks.

A :class:`Choice` collects one choice's events (tokens, text, log-probabilities, its end); the
functions here turn choices into OpenAI's JSON. Besides OpenAI's fields every choice carries the
generated ``token_ids`` (an extension; OpenAI clients ignore it).

Log-probabilities follow OpenAI's two shapes: completions ``{"tokens", "token_logprobs",
"top_logprobs" (a {token: logprob} dict per token), "text_offset"}``; chat ``{"content": [{"token",
"logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}``. A token's text is its
id decoded alone (``token_id:N`` without a tokenizer, as vLLM writes it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .scheduler import Event

Entry = tuple[int, float, tuple[tuple[int, float], ...]]     # (token, its logprob, top alternatives)


@dataclass
class Choice:
    """One choice's progress: ``prompt`` is the index of its prompt in the request, ``prefix`` the echoed
    prompt text (completions with ``echo``)."""

    index: int
    prompt: int
    prompt_tokens: int
    prefix: str = ""
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: Optional[str] = None
    entries: list[Entry] = field(default_factory=list)
    logprobs: bool = False
    started: bool = False                 # a stream has sent this choice's first chunk
    offset: int = -1                      # text offset of the next token in a stream (completions)
    cached_tokens: int = 0                # prompt tokens the replica read from its prefix cache

    def add(self, event: Event) -> None:
        if event.token is not None:
            self.tokens.append(event.token)
            if self.logprobs:
                self.entries.append((event.token, event.logprob, event.top_logprobs))
        self.text += event.text
        self.cached_tokens = event.cached_tokens
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason


class Shapes:
    """Builds OpenAI's objects for one route (``chat`` or completions) and one tokenizer (or none)."""

    def __init__(self, tokenizer, chat: bool) -> None:
        self.tokenizer, self.chat = tokenizer, chat

    def token_text(self, token: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token}"
        return self.tokenizer.decode([token])

    def logprobs(self, entries: list[Entry], offset: int) -> dict:
        """The logprobs object of ``entries``; ``offset`` is where the first one's text starts (completions)."""
        if self.chat:
            return {"content": [dict(self._chat_entry(token, logprob),
                                     top_logprobs=[self._chat_entry(i, lp) for i, lp in top])
                                for token, logprob, top in entries]}
        texts = [self.token_text(token) for token, _, _ in entries]
        offsets = []
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        return {"tokens": texts, "token_logprobs": [logprob for _, logprob, _ in entries],
                "top_logprobs": [{self.token_text(i): lp for i, lp in top} for _, _, top in entries],
                "text_offset": offsets}

    def _chat_entry(self, token: int, logprob: float) -> dict:
        text = self.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", errors="replace"))}

    def whole_choice(self, choice: Choice) -> dict:
        logprobs = self.logprobs(choice.entries, len(choice.prefix)) if choice.logprobs else None
        out = {"index": choice.index, "finish_reason": choice.finish_reason, "logprobs": logprobs,
               "token_ids": choice.tokens}
        if self.chat:
            out["message"] = {"role": "assistant", "content": choice.text}
        else:
            out["text"] = choice.prefix + choice.text
        return out

    def chunk_choice(self, choice: Choice, event: Event) -> dict:
        """The chunk of one event of ``choice`` (already added to it)."""
        tokens = [event.token] if event.token is not None else []
        logprobs = None
        if choice.logprobs:
            if choice.offset < 0:
                choice.offset = len(choice.prefix)
            logprobs = self.logprobs(choice.entries[-1:] if tokens else [], choice.offset)
            if tokens and not self.chat:
                choice.offset += len(logprobs["tokens"][0])
        out = {"index": choice.index, "finish_reason": event.finish_reason, "logprobs": logprobs,
               "token_ids": tokens}
        if self.chat:
            out["delta"] = {"content": event.text} if event.text or not event.finish_reason else {}
            if not choice.started:
                out["delta"] = {"role": "assistant", "content": event.text}
        else:
            out["text"] = (choice.prefix if not choice.started else "") + event.text
        choice.started = True
        return out


def usage(choices: list[Choice]) -> dict:
    """Token counts: each prompt once (the ``n`` choices of a prompt share it, and its first choice says how
    many of its tokens came from the prefix cache), every choice's completion."""
    first = {}
    for c in choices:
        first.setdefault(c.prompt, c)
    prompt = sum(c.prompt_tokens for c in first.values())
    completion = sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in first.values())}}
