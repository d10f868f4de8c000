"""Request bodies of the HTTP API (pydantic, strict).

Strict on purpose: a string where a number belongs, an unknown field (OpenAI answers
"Unrecognized request argument supplied"), or an option this server does not implement is a
400 with a message naming the field, never silently ignored. Limits that depend on the
configuration (``serve.max_k``, ``serve.max_tokens_limit``) are checked by the ingress.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _check_unicode(value: Any, depth: int = 0) -> None:
    """Refuse lone surrogates (``"\\ud800"`` is valid JSON but not encodable text)."""
    if depth > 64:
        raise ValueError("the request body is nested too deeply")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("strings must be valid Unicode text (no lone surrogate escapes)") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_unicode(k, depth + 1)
            _check_unicode(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_unicode(v, depth + 1)


class _Request(_Body):
    """A top-level request body: every string in it must be encodable text."""

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        _check_unicode(data)
        return data


class TextPart(_Body):
    """A text part of a message's content (``{"type": "text", "text": ...}``)."""

    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    """One chat message. Roles: system/developer (instructions), user, assistant."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=256)

    @property
    def text(self) -> str:
        """The content as plain text (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Body):
    """``stream_options``: ``include_usage`` adds a last chunk with token usage."""

    include_usage: bool = False


class ResponseFormat(_Body):
    """Only plain text answers are produced."""

    type: Literal["text"]


class RagOptions(_Body):
    """Extension: how the answer's passages are retrieved and read.

    Attributes:
        k: Passages retrieved (default ``serve.default_k``).
        mode: ``dense``, ``sparse`` or ``hybrid`` (default ``retrieval.mode``).
        reader: ``extractive``, ``stuff`` or ``fid`` (default ``generator.reader``).
        filters: Payload filters, e.g. ``{"source": "*.md", "tag": ["gpu"], "metadata": {"team": "ml"}}``.
    """

    k: int | None = Field(None, ge=1)
    mode: Literal["dense", "sparse", "hybrid"] | None = None
    reader: Literal["stuff", "fid", "extractive"] | None = None
    filters: dict[str, Any] | None = None


_UNSUPPORTED = {
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
}


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions`` (OpenAI chat completions, plus ``rag``)."""

    model: str = Field(min_length=1, max_length=512)
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    min_tokens: int | None = Field(None, ge=0, description="Extension (as in vLLM): no end-of-sequence before this many tokens.")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    n: int | None = Field(None, ge=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    user: str | None = Field(None, max_length=512)
    store: bool | None = None
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    rag: RagOptions | None = None

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        for name, why in _UNSUPPORTED.items():
            if getattr(self, name) is not None:
                raise ValueError(f"'{name}': {why} by this server")
        if self.n not in (None, 1):
            raise ValueError("'n': only n=1 is supported")
        if self.logprobs or self.top_logprobs:
            raise ValueError("'logprobs': log probabilities are not returned by this server")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("'presence_penalty'/'frequency_penalty': penalties are not supported (use 0)")
        if self.logit_bias:
            raise ValueError("'logit_bias' is not supported")
        if self.stream_options is not None and not self.stream:
            raise ValueError("'stream_options' is only allowed with stream: true")
        if isinstance(self.stop, list):
            if len(self.stop) > 4:
                raise ValueError("'stop': at most 4 stop sequences")
            if not all(self.stop):
                raise ValueError("'stop': stop sequences must not be empty")
        if self.max_tokens is not None and self.max_completion_tokens is not None and self.max_tokens != self.max_completion_tokens:
            raise ValueError("'max_tokens' and 'max_completion_tokens' disagree; send one")
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if self.min_tokens and limit is not None and self.min_tokens > limit:
            raise ValueError("'min_tokens' must not exceed 'max_tokens'")
        if self.messages[-1].role != "user":
            raise ValueError("'messages': the last message must be the user's question")
        if not self.messages[-1].text.strip():
            raise ValueError("'messages': the last user message is empty")
        return self

    @property
    def question(self) -> str:
        """The question: the last user message."""
        return self.messages[-1].text.strip()

    @property
    def stop_list(self) -> list[str] | None:
        """``stop`` as a list (None when not given)."""
        if self.stop is None:
            return None
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def token_limit(self) -> int | None:
        """``max_completion_tokens`` or ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def history(self, turns: int) -> list[tuple[str, str]]:
        """The last ``turns`` user/assistant messages before the question, as (role, text)."""
        if turns <= 0:
            return []
        earlier = [(m.role, m.text.strip()) for m in self.messages[:-1] if m.role in ("user", "assistant") and m.text.strip()]
        return earlier[-turns:]


class SearchBody(_Request):
    """``POST /v1/search``: retrieval only."""

    query: str = Field(min_length=1, max_length=20_000)
    k: int | None = Field(None, ge=1)
    mode: Literal["dense", "sparse", "hybrid"] | None = None
    fusion: Literal["rrf", "dbsf"] | None = None
    filters: dict[str, Any] | None = None
    score_threshold: float | None = Field(None, allow_inf_nan=False)

    @model_validator(mode="after")
    def _not_blank(self) -> SearchBody:
        if not self.query.strip():
            raise ValueError("'query' is empty")
        return self


class EmbeddingsRequest(_Request):
    """``POST /v1/embeddings`` (OpenAI shape; ``input_type`` is an extension)."""

    input: str | list[str]
    model: str = Field(min_length=1, max_length=512)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = Field(None, max_length=512)
    input_type: Literal["passage", "query"] = Field(
        "passage", description="'passage' embeds text as stored documents; 'query' adds the model's query instruction."
    )

    @model_validator(mode="after")
    def _inputs(self) -> EmbeddingsRequest:
        texts = self.texts
        if not texts:
            raise ValueError("'input' must not be empty")
        if any(not t.strip() for t in texts):
            raise ValueError("'input' must not contain empty strings")
        return self

    @property
    def texts(self) -> list[str]:
        """``input`` as a list."""
        return [self.input] if isinstance(self.input, str) else list(self.input)


class FeedbackBody(_Request):
    """``POST /v1/feedback``: a rating of an answered chat request."""

    request_id: str = Field(min_length=1, max_length=200)
    rating: Literal["up", "down"]
    comment: str | None = Field(None, max_length=10_000)
    preferred_answer: str | None = Field(None, max_length=50_000)


class RouteBody(_Request):
    """``POST /v1/admin/routes``: set (or with ``weights: null`` clear) the split of one name."""

    name: str = Field(min_length=1, max_length=200)
    weights: dict[str, float] | None = Field(description="Variant → weight (>= 0, summing to 1); null clears the stored split.")
    note: str | None = Field(None, max_length=1000)
