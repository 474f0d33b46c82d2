"""The HTTP API's requests and responses, declared with Pydantic (served as /openapi.json).

OpenAI's shapes for /v1/completions, /v1/chat/completions, /v1/embeddings and /v1/models; vLLM's
for /tokenize, /detokenize and /tokenizer_info, and vLLM's extra sampling fields (top_k,
repetition_penalty, min_tokens, ...). Types are strict (a string is not a number, 1 is not true).
An unknown field is refused by name; fields OpenAI accepts that change nothing here (user, store,
metadata, service_tier) are accepted; features this server does not have are declared, so that
asking for them is a clear 400 (server.py says which), not a silent no-op.
No tensors and no HTTP here: plain data only.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

Number = Annotated[float, Field(allow_inf_nan=False, strict=True)]
TokenIds = list[StrictInt]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Request):
    include_usage: StrictBool = False


class SamplingFields(Request):
    """Fields /v1/completions and /v1/chat/completions share."""

    model: StrictStr | None = Field(None, description="must be the served model's id when given")
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = Field(
        None, description="0 is greedy; one too small to sample from is greedy too (default 1)"
    )
    top_p: Annotated[Number, Field(ge=0, le=1)] | None = Field(
        None, description="nucleus; the most likely token is always kept (default 1)"
    )
    top_k: StrictInt | None = Field(None, ge=-1, description="vLLM's: 0 or -1 = no limit")
    n: StrictInt = Field(1, ge=1, description="choices per prompt")
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = Field(None, ge=-(2**63), lt=2**63)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[Number, Field(gt=0, le=10)] | None = Field(
        None, description="vLLM's (CTRL's): > 1 discourages repeats (default 1 = off)"
    )
    min_tokens: StrictInt = Field(0, ge=0, description="vLLM's: no stop id before this many tokens")
    logit_bias: dict[str, Annotated[Number, Field(ge=-100, le=100)]] | None = Field(
        None, description="token id (as a string) -> bias added to its logit"
    )
    ignore_eos: StrictBool = Field(False, description="vLLM's: do not stop at the end-of-text token")
    stop_token_ids: list[StrictInt] | None = Field(
        None, description="vLLM's: more token ids that end a choice"
    )
    skip_special_tokens: StrictBool = Field(
        True, description="vLLM's: special tokens (a chat template's) are not shown in the text"
    )
    user: StrictStr | None = Field(None, description="accepted; changes nothing")
    store: StrictBool | None = Field(None, description="accepted; nothing is stored")
    metadata: dict[str, StrictStr] | None = Field(None, description="accepted; changes nothing")
    service_tier: StrictStr | None = Field(None, description="accepted; changes nothing")
    prompt_cache_key: StrictStr | None = Field(None, description="accepted; changes nothing")
    safety_identifier: StrictStr | None = Field(None, description="accepted; changes nothing")


class CompletionRequest(SamplingFields):
    prompt: StrictStr | TokenIds | list[StrictStr] | list[TokenIds] = Field(
        description="a string, token ids, or a list of either (one choice set per prompt)"
    )
    max_tokens: StrictInt | None = Field(16, ge=0, description="0 with echo: score the prompt only")
    logprobs: StrictInt | None = Field(None, ge=0, le=20, description="alternatives per token")
    echo: StrictBool = Field(False, description="the prompt comes back first (scored with logprobs)")
    best_of: StrictInt | None = Field(None, ge=1, description="only equal to n")
    suffix: StrictStr | None = Field(None, description="not supported: insertion")


class TextPart(Request):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None
    name: StrictStr | None = None


class ResponseFormat(Request):
    type: StrictStr


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = Field(None, description='only {"type": "text"}')
    tools: list[Any] | None = Field(None, description="not supported")
    tool_choice: Any = Field(None, description="not supported")
    parallel_tool_calls: StrictBool | None = Field(None, description="not supported")
    functions: list[Any] | None = Field(None, description="not supported")
    function_call: Any = Field(None, description="not supported")
    modalities: list[StrictStr] | None = Field(None, description='only ["text"]')
    audio: Any = Field(None, description="not supported")
    reasoning_effort: StrictStr | None = Field(None, description="not supported")
    prediction: Any = Field(None, description="not supported")
    web_search_options: Any = Field(None, description="not supported")
    verbosity: StrictStr | None = Field(None, description="not supported")


class EmbeddingRequest(Request):
    input: StrictStr | TokenIds | list[StrictStr] | list[TokenIds]
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(None, ge=1, description="only the model's n_embd")
    user: StrictStr | None = None


class TokenizeRequest(Request):
    """vLLM's /tokenize: a prompt, or chat messages in the chat template."""

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = Field(
        True, description="accepted; GPT-2 has no BOS to add, so it changes nothing"
    )
    add_generation_prompt: StrictBool = True
    return_token_strs: StrictBool = False


class DetokenizeRequest(Request):
    model: StrictStr | None = None
    tokens: TokenIds


# --- responses ------------------------------------------------------------------------------------


class Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorBody(Response):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(Response):
    error: ErrorBody


class Usage(Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(Response):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(Response):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(Response):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Response):
    content: list[ChatTokenLogprob]


class AssistantMessage(Response):
    role: Literal["assistant"]
    content: str


class ChatChoice(Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(Response):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Embedding(Response):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class EmbeddingUsage(Response):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(Response):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(Response):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    context_length: int
    max_tokens: int
    max_model_len: int


class ModelList(Response):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(Response):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(Response):
    prompt: str


class TokenizerInfo(Response):
    """vLLM's /tokenizer_info: the tokenizer's configuration, as in a tokenizer_config.json."""

    tokenizer_class: str
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    model_max_length: int
    vocab_size: int
    added_tokens: dict[str, int]
    chat_template: str | None


class Health(Response):
    status: str
    model: str
    active: int
    waiting: int
