"""The bodies of OpenAI's completions and chat completions requests that ``plait serve`` takes, and what
each becomes: prompts and one :class:`~plait.serve.sampling.SamplingParams` per choice.

Every field OpenAI defines for these routes is either honoured or refused by name with a 400
(a field set to null counts as absent, since some clients send every field). Honoured:

=======================  ====================================================================
field                    meaning here
=======================  ====================================================================
``model``                one of the served names (else 404 ``model_not_found``)
``prompt``               completions: text, token ids, or a list of either (a choice each)
``messages``             chat: roles system/developer/user/assistant/tool, content as text or
                         a list of ``{"type": "text"}`` parts
``max_tokens``           completions default 16; chat default: up to the context
``max_completion_tokens``  chat: the same as ``max_tokens`` and wins over it
``n``                    choices per prompt; with a ``seed``, choice ``i`` uses ``seed + i``
``temperature``,         as OpenAI (``temperature`` 0: greedy)
``top_p``, ``seed``
``stop``                 strings; ``stop_token_ids`` (vLLM's extension) ids
``presence_penalty``,    OpenAI's; ``repetition_penalty`` (vLLM's extension) transformers'
``frequency_penalty``
``logprobs``             completions: an integer k (alternatives per token, at most 20);
                         chat: true, with ``top_logprobs`` k
``echo``                 completions: the prompt's text precedes the completion (not with
                         ``logprobs``: prompt log-probabilities are not computed)
``stream``,              server-sent events; ``include_usage`` adds the usage chunk at the end
``stream_options``
``best_of``              only equal to ``n`` (no candidates beyond the returned choices)
``user``                 accepted and ignored
=======================  ====================================================================

Extensions besides those: ``top_k``, ``ignore_eos``, ``timeout`` (seconds, this request's deadline).
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from .sampling import MAX_SEED, BadParam, SamplingParams

Number = Union[StrictInt, StrictFloat]
COMPLETION_MAX_TOKENS = 16          # OpenAI's default for /v1/completions


class Refused(ValueError):
    """A request plait serve cannot honour; ``param`` names the field."""

    def __init__(self, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.param = param


class _Strict(BaseModel):
    """Unknown fields are refused by name; fields sent as null count as absent."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class _Body(_Strict):
    model: StrictStr
    max_tokens: Optional[StrictInt] = None
    temperature: Number = 1.0
    top_p: Number = 1.0
    top_k: StrictInt = 0
    seed: Optional[StrictInt] = None
    stop: Union[StrictStr, list[StrictStr]] = []
    stop_token_ids: list[StrictInt] = []
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    n: StrictInt = 1
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    repetition_penalty: Number = 1.0
    ignore_eos: StrictBool = False
    timeout: Optional[Number] = None
    user: Optional[StrictStr] = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def check(self) -> None:
        """Refuse combinations no single field's type rules out."""
        if not 1 <= self.n <= 128:
            raise Refused(f"n must be an integer in [1, 128], got {self.n}", "n")
        if self.stream_options is not None and not self.stream:
            raise Refused("stream_options is only allowed when stream is true", "stream_options")

    def logprobs_k(self) -> Optional[int]:
        """Alternatives per token to report (None: no log-probabilities); each route reads its own fields."""
        return None

    prompt_field: ClassVar[str] = "prompt"     # the field that holds the prompt, named by errors about it

    def params(self, prompt_len: int, context: int, vocab_size: Optional[int] = None) -> list[SamplingParams]:
        """One :class:`SamplingParams` per choice (``n``) of a prompt of ``prompt_len`` tokens in a model of
        ``context`` positions (vLLM's rule: prompt + completion <= context); :class:`Refused` naming the
        request's own field for a bad value."""
        if self.seed is not None and not 0 <= self.seed < MAX_SEED:   # before choice i's seed + i wraps it
            raise Refused(f"seed must be an integer in [0, 2**53), got {self.seed}", "seed")
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in self.stop_token_ids):
            raise Refused(f"stop_token_ids must lie in [0, {vocab_size}), got {self.stop_token_ids}",
                          "stop_token_ids")
        room = context - prompt_len
        if room < 1:
            raise Refused(f"the prompt has {prompt_len} tokens, which leaves none of the model's context of "
                          f"{context} tokens for the completion", self.prompt_field)
        max_tokens = self.max_new_tokens(room)
        seeds = [None] * self.n if self.seed is None else [(self.seed + i) % MAX_SEED for i in range(self.n)]
        try:
            return [SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_k=self.top_k,
                                   top_p=self.top_p, seed=seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
                                   ignore_eos=self.ignore_eos, timeout=self.timeout,
                                   presence_penalty=self.presence_penalty,
                                   frequency_penalty=self.frequency_penalty,
                                   repetition_penalty=self.repetition_penalty, logprobs=self.logprobs_k())
                    for seed in seeds]
        except BadParam as err:
            field = self.field_of(err.param)
            raise Refused(f"{field} {err.rule}, got {err.value!r}", field) from None

    def field_of(self, param: str) -> str:
        """The request field that sets sampling parameter ``param``."""
        return param

    def max_new_tokens(self, room: int) -> int:
        """Tokens to generate with ``room`` positions of context left after the prompt: the request's own
        limit (Refused past the room, as vLLM answers), else OpenAI's default of 16 within the room."""
        if self.max_tokens is None:
            return min(COMPLETION_MAX_TOKENS, room)
        return _within(self.max_tokens, room, "max_tokens")


def _within(asked: int, room: int, field: str) -> int:
    if isinstance(asked, int) and asked > room:
        raise Refused(f"{field} is {asked}, but only {room} tokens of the model's context are left after the "
                      f"prompt (prompt + completion must fit the context)", field)
    return asked


class CompletionBody(_Body):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    echo: StrictBool = False
    logprobs: Optional[StrictInt] = None
    best_of: Optional[StrictInt] = None

    def check(self) -> None:
        super().check()
        if isinstance(self.prompt, list) and not self.prompt:
            raise Refused("prompt is empty; give text, token ids, or a list of either", "prompt")
        if self.best_of is not None and self.best_of != self.n:
            raise Refused(f"best_of must equal n ({self.n}): plait serve returns every candidate it generates",
                          "best_of")
        if self.echo and self.logprobs is not None:
            raise Refused("echo with logprobs is not supported: plait serve does not compute the log-probabilities "
                          "of prompt tokens", "echo")

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompts of the request, each text or token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)

    def logprobs_k(self) -> Optional[int]:
        return self.logprobs


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[StrictStr, list[TextPart]] = ""
    name: Optional[StrictStr] = None
    tool_call_id: Optional[StrictStr] = None

    def for_template(self) -> dict:
        """The message as a chat template takes it: role and text content."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


class ChatBody(_Body):
    prompt_field: ClassVar[str] = "messages"
    messages: list[Message]
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: StrictBool = False
    top_logprobs: Optional[StrictInt] = None

    def check(self) -> None:
        super().check()
        if not self.messages:
            raise Refused("messages is empty; give at least one message", "messages")
        if self.top_logprobs is not None and not self.logprobs:
            raise Refused("top_logprobs needs logprobs set to true", "top_logprobs")

    def logprobs_k(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None

    def field_of(self, param: str) -> str:
        if param == "logprobs":
            return "top_logprobs"
        if param == "max_tokens" and self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return param

    def max_new_tokens(self, room: int) -> int:
        """``max_completion_tokens``, else ``max_tokens``, else the rest of the context (OpenAI's chat default)."""
        for value, field in ((self.max_completion_tokens, "max_completion_tokens"), (self.max_tokens, "max_tokens")):
            if value is not None:
                return _within(value, room, field)
        return room
