"""POST /tokenize and /detokenize (vLLM's shapes): the served tokenizer, without generating.

A client counts tokens, checks a prompt against the context, or renders a chat exactly as the
chat endpoint will: messages go through the chat endpoint's own prompt builder, so what /tokenize
counts is what /v1/chat/completions feeds the model. Unknown fields are refused (400 naming them)
like everywhere else.
"""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, ValidationError

from trt_gemma.server import chat, serving
from trt_gemma.server.engine_client import EngineClient
from trt_gemma.server.errors import APIError
from trt_gemma.server.protocol import ChatCompletionRequest, ChatMessage, ChatTool


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class TokenizeCompletionRequest(_Request):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True  # the leading <bos>, as a completion prompt gets it
    return_token_strs: bool = False


class TokenizeChatRequest(_Request):
    model: str | None = None
    messages: list[ChatMessage]
    add_generation_prompt: bool = True
    tools: list[ChatTool] | None = None  # rendered as the chat endpoint renders them
    return_token_strs: bool = False


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


def tokenize_request(body: dict[str, Any]) -> TokenizeCompletionRequest | TokenizeChatRequest:
    """A chat body if it has messages, else a prompt body. Chosen here rather than by a pydantic
    union, whose errors for a body that fits neither would name the wrong field."""
    kind = TokenizeChatRequest if "messages" in body else TokenizeCompletionRequest
    try:
        return kind.model_validate(body)
    except ValidationError as e:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)],
            body=body) from None


def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest, client: EngineClient,
             model_name: str) -> dict[str, Any]:
    """{count, max_model_len, tokens[, token_strs]}."""
    serving.check_model(body.model, model_name)
    tokenizer = client.tokenizer
    if isinstance(body, TokenizeChatRequest):
        request = ChatCompletionRequest.model_construct(
            messages=body.messages, add_generation_prompt=body.add_generation_prompt,
            tools=body.tools)
        ids = chat.render_prompt(client, request, chat.tool_plan(client, request)).ids
    else:
        ids = tokenizer.encode(body.prompt, add_bos=body.add_special_tokens)
    answer: dict[str, Any] = {"count": len(ids), "max_model_len": client.max_model_len,
                              "tokens": ids}
    if body.return_token_strs:
        answer["token_strs"] = [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    return answer


def detokenize(body: DetokenizeRequest, client: EngineClient, model_name: str) -> dict[str, str]:
    """{prompt}: the text of the ids, special tokens included (tokenize's inverse)."""
    serving.check_model(body.model, model_name)
    bad = next((t for t in body.tokens if not 0 <= t < client.vocab_size), None)
    if bad is not None:
        raise APIError(400, f"tokens: {bad} is not a token id of this model (ids are in "
                       f"[0, {client.vocab_size}))", param="tokens")
    return {"prompt": client.tokenizer.decode(body.tokens, skip_special_tokens=False)}
