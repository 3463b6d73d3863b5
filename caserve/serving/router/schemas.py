"""Pydantic request models of the OpenAI-compatible public API, and builders for its responses.

Only parameters caserve honours are accepted with meaning; OpenAI parameters it does not implement are
accepted when they are at their neutral value and rejected with 400 otherwise (see ``check_supported``).
"""

from __future__ import annotations

import base64
import struct
import time
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from caserve.serving.errors import BadRequest

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
    user: Optional[str] = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(ModelRequest):
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    ignore_eos: bool = False  # extension (as in vLLM): generate exactly max_tokens tokens

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Optional[Union[str, list[str]]]) -> Optional[list[str]]:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else list(v)
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be at most 4 non-empty strings")
        return stops

    def check_supported(self) -> None:
        if self.n != 1:
            raise BadRequest("only n=1 is supported", param="n")
        for name in ("logprobs", "top_logprobs", "best_of", "echo", "suffix", "tools", "functions"):
            value = (self.model_extra or {}).get(name)
            if value not in (None, False, 0, 1, [], "") or (name == "best_of" and value not in (None, 1)):
                raise BadRequest(f"parameter {name!r} is not supported", param=name)

    def sampling_params(self, default_max_tokens: int) -> dict[str, Any]:
        return {
            "max_tokens": self.max_tokens or default_max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": self.stop or [],
            "seed": self.seed,
            "ignore_eos": self.ignore_eos,
        }

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    prompt: Prompt

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompt as a list of single prompts (text or token ids)."""
        return split_prompt(self.prompt, "prompt")


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

    def sampling_params(self, default_max_tokens: int) -> dict[str, Any]:
        params = super().sampling_params(default_max_tokens)
        if self.max_completion_tokens is not None:
            params["max_tokens"] = self.max_completion_tokens
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
