"""The OpenAI request bodies `llmctl serve` accepts, as strict pydantic models, and its error shape.

Strict: a wrong type is an error, not a coercion ("5" is not 5), and an unknown field is an error
(a misspelt `max_token` would otherwise be ignored silently). Besides OpenAI's fields: `top_k`,
`repetition_penalty` and `return_token_ids` (the prompt's and each choice's token ids), as vLLM names
them. Presence and frequency penalties are accepted only at 0 (what the engine does).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_STOP = 4  # OpenAI's limit on stop sequences


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        return {
            401: "authentication_error",
            404: "not_found_error",
            413: "invalid_request_error",
            429: "rate_limit_error",
            503: "service_unavailable",
        }.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _field_path(loc: tuple) -> str:
    """`messages.0.content` from a pydantic location, without the union members it tried
    (`prompt.str`, `prompt.list[int]`)."""
    names = [str(p) for p in loc if isinstance(p, int) or ("[" not in p and p not in _TYPE_TAGS)]
    return ".".join(names)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def validation_error(exc: ValidationError) -> ApiError:
    """A 400 naming the first invalid field (`messages.0.content`), its problems in the message."""
    problems: dict[str, list[str]] = {}
    for e in exc.errors(include_url=False):
        problems.setdefault(_field_path(e["loc"]) or "body", []).append(e["msg"])
    first = next(iter(problems))
    message = "; ".join(
        f"{path}: {' or '.join(dict.fromkeys(msgs))}" for path, msgs in list(problems.items())[:5]
    )
    return ApiError(400, message, param=None if first == "body" else first, code="invalid_value")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="Send a last chunk with the usage of the whole request.")


class TextPart(_Strict):
    type: Literal["text"] = Field(description="Only text parts.")
    text: str = Field(description="The text.")


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"] = Field(description="Who speaks.")
    content: str | list[TextPart] = Field(description="The text, or a list of text parts.")
    name: str | None = Field(None, description="Accepted and ignored.")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class _Sampling(_Strict):
    """Fields both endpoints share."""

    model: str = Field(description="The served model's id (GET /v1/models).")
    stream: bool = Field(False, description="Answer with server-sent events.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options.")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, le=2**31 - 1, description="Sample from the k most likely (0 = off).")
    repetition_penalty: float = Field(1.0, gt=0, le=100, description="> 1 discourages repeats.")
    presence_penalty: float = Field(0.0, ge=0, le=0, description="Only 0 is supported.")
    frequency_penalty: float = Field(0.0, ge=0, le=0, description="Only 0 is supported.")
    n: int = Field(1, ge=1, le=128, description="Choices per prompt.")
    seed: Int64 | None = Field(None, description="Sampling seed: the same seed gives the same choices.")
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOP} stop sequences.")
    user: str | None = Field(None, description="Accepted and ignored.")
    return_token_ids: bool = Field(
        False, description="Also return prompt_token_ids and each choice's token_ids."
    )

    @model_validator(mode="after")
    def _check_stop(self):
        stops = self.stop_strings()
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"stop: at most {MAX_STOP} non-empty strings")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed with stream: true")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1, description="Most tokens per choice (old name).")
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1, description="Most tokens per choice.")
    logprobs: bool = Field(False, description="Return each token's log-probability.")
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="Also the k most likely tokens at each step."
    )

    @model_validator(mode="after")
    def _check_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        return self

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]] = Field(
        description="A prompt, token ids, or a list of either."
    )
    max_tokens: int | None = Field(16, ge=1, le=2**31 - 1, description="Most tokens per choice.")
    logprobs: int | None = Field(
        None, ge=0, le=20, description="Log-probabilities of the k most likely tokens."
    )
    echo: Literal[False] = Field(False, description="Only false is supported.")

    @property
    def limit(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list of texts or token-id lists (one prompt is a list of one)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]
