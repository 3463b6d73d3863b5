"""Pydantic request models of the OpenAI-compatible public API, and builders for its responses.

Only parameters caserve honours are accepted with meaning; OpenAI parameters it does not implement are
accepted when they are at their neutral value and rejected with 400 otherwise (see ``UNSUPPORTED`` and
``check_supported``); unknown fields are ignored, as OpenAI does.
"""

from __future__ import annotations

import base64
import struct
import time
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator

from caserve.serving.errors import BadRequest
from caserve.serving.messages import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_STOP_IDS, TokenLogprob, TopLogprob

Prompt = Union[str, list[str], list[int], list[list[int]]]


def split_prompt(p: Prompt, param: str) -> list[Union[str, list[int]]]:
    """A prompt/input field as a list of single items, each a text or a list of token ids."""
    if isinstance(p, str):
        return [p]
    if not p:
        raise BadRequest(f"{param} must not be empty", param=param)
    if all(isinstance(x, int) for x in p):
        return [list(p)]  # type: ignore[arg-type]
    if any(isinstance(x, list) and not x for x in p):
        raise BadRequest(f"{param} must not contain empty token lists", param=param)
    return list(p)  # type: ignore[arg-type]


class ModelRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are ignored, like OpenAI does
    model: str = Field(min_length=1)
    user: Optional[str] = Field(default=None, max_length=256)  # the end user, recorded in the router's log


class StreamOptions(BaseModel):
    include_usage: bool = False


def _neutral(value: Any, *neutral: Any) -> bool:
    """Whether ``value`` is one of ``neutral``, compared by type as well (``True == 1`` in Python)."""
    return any(type(value) is type(n) and value == n for n in neutral)


# OpenAI (and common extension) parameters caserve does not implement, each with the values that mean
# "not used": anything else is refused with 400 naming the parameter, never ignored.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "suffix": (None, ""),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
    "store": (None, False),  # OpenAI keeps the completion for its evals: caserve keeps nothing
    "service_tier": (None, "auto", "default"),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1.0, 1),
    "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "structured_outputs": (None,),
    "truncate_prompt_tokens": (None,),
    "bad_words": (None, []),
    "allowed_token_ids": (None,),
    "prompt_logprobs": (None,),
    "logits_processors": (None, []),
    "return_tokens_as_token_ids": (None, False),
}

# Chat-only extensions (as in vLLM) that change what the model is asked or what comes back.
CHAT_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "echo": (None, False),
    "add_generation_prompt": (None, True),
    "continue_final_message": (None, False),
    "chat_template": (None,),
    "chat_template_kwargs": (None, {}),
    "documents": (None,),
}


def refuse_unsupported(extra: dict[str, Any], unsupported: dict[str, tuple[Any, ...]]) -> None:
    for name, neutral in unsupported.items():
        if name in extra and not _neutral(extra[name], *neutral):
            raise BadRequest(f"parameter {name!r} is not supported by caserve", param=name)


MAX_N = 16


class SamplingRequest(ModelRequest):
    max_tokens: Optional[int] = Field(default=None, ge=0)  # 0 only with echo (scoring a prompt)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: Annotated[int, Strict()] = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[Annotated[int, Strict()]] = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = None
    # extensions (as in vLLM)
    top_k: Annotated[int, Strict()] = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)
    min_tokens: Annotated[int, Strict()] = Field(default=0, ge=0)
    stop_token_ids: Optional[list[Annotated[int, Strict(), Field(ge=0)]]] = Field(default=None,
                                                                                  max_length=MAX_STOP_IDS)
    ignore_eos: bool = False  # generate exactly max_tokens tokens

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Optional[Union[str, list[str]]]) -> Optional[list[str]]:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else list(v)
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be at most 4 non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        if not v:
            return None
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens")
        for key, bias in v.items():
            if not key.isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError("logit_bias values must be in [-100, 100]")
        return {str(int(k)): float(b) for k, b in v.items()}

    def check_supported(self) -> None:
        extra = self.model_extra or {}
        refuse_unsupported(extra, UNSUPPORTED)
        best_of = extra.get("best_of")  # a completions field: on chat, only its neutral value
        if best_of is not None and not _neutral(best_of, self.n):
            raise BadRequest("parameter 'best_of' is not supported on chat completions (only best_of == n)",
                             param="best_of")
        if self.stream_options is not None and not self.stream:
            raise BadRequest("stream_options is only allowed when stream is true", param="stream_options")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise BadRequest("min_tokens must not exceed max_tokens", param="min_tokens")

    def sampling_params(self, default_max_tokens: int) -> dict[str, Any]:
        """The per-row parameters a worker receives (``worker.sampling.SamplingParams`` fields)."""
        return {
            "max_tokens": default_max_tokens if self.max_tokens is None else self.max_tokens,
            "fit_context": self.max_tokens is None,  # a default shrinks to fit; an asked-for one must fit
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": 0 if self.top_k in (-1, 0) else self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "logit_bias": {int(k): b for k, b in (self.logit_bias or {}).items()},
            "seed": self.seed,
            "min_tokens": self.min_tokens,
            "stop": self.stop or [],
            "stop_token_ids": list(self.stop_token_ids or []),
            "ignore_eos": self.ignore_eos,
        }

    @property
    def candidates(self) -> int:
        """Choices generated per prompt: ``n``, or ``best_of`` on completions."""
        return self.n

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    prompt: Prompt
    logprobs: Optional[Annotated[int, Strict()]] = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: Annotated[bool, Strict()] = False
    best_of: Optional[Annotated[int, Strict()]] = Field(default=None, ge=1, le=MAX_N)

    @property
    def candidates(self) -> int:
        return self.best_of if self.best_of is not None else self.n

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompt as a list of single prompts (text or token ids)."""
        return split_prompt(self.prompt, "prompt")

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of is not None and self.best_of < self.n:
            raise BadRequest("best_of must be at least n", param="best_of")
        if self.stream and self.candidates > self.n:
            raise BadRequest("best_of cannot be streamed (the best candidates are known only at the end)",
                             param="best_of")
        if self.max_tokens == 0 and not self.echo:
            raise BadRequest("max_tokens must be at least 1 (0 only with echo)", param="max_tokens")

    def sampling_params(self, default_max_tokens: int) -> dict[str, Any]:
        params = super().sampling_params(default_max_tokens)
        params["logprobs"] = self.logprobs
        if self.candidates > self.n and self.logprobs is None:
            params["logprobs"] = 0  # best_of ranks the candidates by their tokens' logprobs
        if self.echo:  # the prompt's own logprobs (its text, for token-id prompts, comes with them)
            params["prompt_logprobs"] = self.logprobs if self.logprobs is not None else 0
        return params


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[dict[str, Any]], None] = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise BadRequest("only text content parts are supported", param="messages")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: Optional[Annotated[bool, Strict()]] = False
    top_logprobs: Optional[Annotated[int, Strict()]] = Field(default=None, ge=0, le=MAX_LOGPROBS)

    def check_supported(self) -> None:
        super().check_supported()
        refuse_unsupported(self.model_extra or {}, CHAT_UNSUPPORTED)
        if self.max_tokens == 0:
            raise BadRequest("max_tokens must be at least 1", param="max_tokens")
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")

    def sampling_params(self, default_max_tokens: int) -> dict[str, Any]:
        params = super().sampling_params(default_max_tokens)
        if self.max_completion_tokens is not None:
            params["max_tokens"], params["fit_context"] = self.max_completion_tokens, False
        if self.logprobs:
            params["logprobs"] = self.top_logprobs or 0
        return params


class EmbeddingRequest(ModelRequest):
    input: Prompt
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(default=None, ge=1)

    def inputs(self) -> list[Union[str, list[int]]]:
        return split_prompt(self.input, "input")


class ClassificationRequest(ModelRequest):
    """caserve extension: ``POST /v1/classifications`` with ``input`` text(s)."""

    input: Union[str, list[str]]

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


# ---------------------------------------------------------------------------------------------- responses


def now_unix() -> int:
    return int(time.time())


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def encode_embedding(vector: list[float], encoding_format: str) -> Union[list[float], str]:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


def model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "caserve"}


# The worker names every token (the router has no tokenizer): see ``messages.TokenLogprob``.


def completion_logprobs(entries: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object: ``top_logprobs`` holds the alternatives and the chosen
    token (so up to k + 1 of them, as OpenAI); ``text_offset`` counts characters from ``offset``."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        out["tokens"].append(e.token)
        out["token_logprobs"].append(e.logprob)
        if e.logprob is None:
            out["top_logprobs"].append(None)
        else:
            top = {t.token: t.logprob for t in e.top}
            top.setdefault(e.token, e.logprob)
            out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(e.token)
    return out


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    """The chat ``logprobs`` object: ``content`` with one item per token and its ``top_logprobs``."""

    def item(e: TopLogprob) -> dict[str, Any]:
        return {"token": e.token, "logprob": e.logprob, "bytes": e.bytes}

    return {"content": [{**item(e), "top_logprobs": [item(t) for t in e.top]} for e in entries], "refusal": None}
