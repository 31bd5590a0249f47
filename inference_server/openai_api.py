"""OpenAI-compatible HTTP front of an engine: evaluate the current policy with any client.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /health`` and ``GET /metrics`` (Prometheus text). Bound to 127.0.0.1 unless
``--host`` says otherwise: the server has no authentication of its own, so expose
it only through an SSH tunnel or behind the cluster's own access control.

Request bodies pass ``common.http``'s guard: NaN, Infinity, numbers that overflow a float
and strings that are not valid Unicode get a 422 naming the field. A prompt whose tokens plus
``max_tokens`` exceed the model's context gets a 400 saying the numbers, as OpenAI's API
does (never a silent clamp). Error bodies carry FastAPI's ``detail`` and OpenAI's ``error``
object, whose ``message`` OpenAI's clients show in their exceptions.

Handlers call the engine from FastAPI's thread pool. Engines are thread-safe:
the vLLM engine batches concurrent HTTP requests together, the transformers
engine serves them one at a time.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException
from fastapi.responses import PlainTextResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from common.http import SafeJSONResponse, install
from inference_server.protocol import GenerateRequest, GenerateResult, SamplingParams
from inference_server.tokens import (
    PromptFormat,
    encode_conversations,
    encode_prompts,
    has_chat_template,
)

StopString = Annotated[str, StringConstraints(min_length=1)]


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int = Field(64, ge=1, le=32768)
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128)
    stop: StopString | list[StopString] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)

    def params(self) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_tokens,
            stop=stop,
            seed=self.seed,
        )


class CompletionRequest(_Sampling):
    """Body of ``POST /v1/completions``."""

    prompt: str | list[str] = Field(min_length=1)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    policy_version: int


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    finish_reason: str


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    policy_version: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "caravela"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    policy_version: int


def create_app(
    engine: Any,
    tokenizer: Any,
    model_name: str,
    prompt_format: PromptFormat = "plain",
    system: str | None = None,
) -> FastAPI:
    """An app serving ``engine`` (any object with ``generate`` and ``version``).
    ``/v1/completions`` encodes its prompts in ``prompt_format`` with ``system``, as a run
    with ``[prompt] format``/``system`` does (``inference_server.tokens``); the chat route
    applies the tokenizer's chat template to the request's messages."""
    app = FastAPI(title="Caravela inference server", default_response_class=SafeJSONResponse)
    install(app, openai_errors=True)  # body guard; error bodies as OpenAI's clients read them
    started = int(time.time())
    registry = CollectorRegistry()
    requests_total = Counter(
        "caravela_inference_requests", "HTTP generation requests", ["route"], registry=registry
    )
    tokens_total = Counter(
        "caravela_inference_generated_tokens", "Completion tokens generated", registry=registry
    )
    version_gauge = Gauge(
        "caravela_inference_policy_version", "Weight version served", registry=registry
    )

    def run(prompts: list[list[int]], params: SamplingParams) -> list[GenerateResult]:
        reqs = [
            GenerateRequest(request_id=str(i), prompt_ids=p, sampling=params)
            for i, p in enumerate(prompts)
        ]
        try:
            results = engine.generate(reqs)
        except ValueError as e:  # ContextLengthError: prompt + max_tokens exceed the context
            raise HTTPException(status_code=400, detail=str(e)) from None
        tokens_total.inc(sum(len(c.token_ids) for r in results for c in r.completions))
        return results

    def usage(prompts: list[list[int]], results: list[GenerateResult], n: int) -> Usage:
        p = sum(len(x) for x in prompts) * n
        c = sum(len(c.token_ids) for r in results for c in r.completions)
        return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)

    def check_model(name: str | None) -> None:
        if name not in (None, model_name):
            raise HTTPException(
                404, detail=f"model {name!r} is not served here; use {model_name!r}"
            )

    @app.get("/health", response_model=Health)
    def health() -> Health:
        return Health(model=model_name, policy_version=engine.version)

    @app.get("/v1/models", response_model=ModelList)
    def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, created=started)])

    @app.post("/v1/completions", response_model=CompletionResponse)
    def completions(body: CompletionRequest) -> CompletionResponse:
        check_model(body.model)
        requests_total.labels("completions").inc()
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        prompts = encode_prompts(tokenizer, texts, prompt_format, system)
        results = run(prompts, body.params())
        choices = [
            CompletionChoice(index=i * body.n + j, text=c.text, finish_reason=c.finish_reason)
            for i, r in enumerate(results)
            for j, c in enumerate(r.completions)
        ]
        return CompletionResponse(
            id=f"cmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=model_name,
            choices=choices,
            usage=usage(prompts, results, body.n),
            policy_version=engine.version,
        )

    @app.post("/v1/chat/completions", response_model=ChatResponse)
    def chat(body: ChatRequest) -> ChatResponse:
        check_model(body.model)
        requests_total.labels("chat").inc()
        messages = [m.model_dump() for m in body.messages]
        if has_chat_template(tokenizer):  # the template's own special tokens, BOS included
            try:
                prompts = encode_conversations(tokenizer, [messages])
            except ValueError as e:  # the template refused the messages (e.g. a system role)
                raise HTTPException(400, detail=str(e)) from e
        else:  # models without a chat template (the tiny default): the contents, in order
            prompts = encode_prompts(tokenizer, ["".join(m["content"] for m in messages)])
        (result,) = run(prompts, body.params())
        choices = [
            ChatChoice(
                index=j, message=ChatChoiceMessage(content=c.text), finish_reason=c.finish_reason
            )
            for j, c in enumerate(result.completions)
        ]
        return ChatResponse(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=model_name,
            choices=choices,
            usage=usage(prompts, [result], body.n),
            policy_version=engine.version,
        )

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        version_gauge.set(engine.version)
        return PlainTextResponse(generate_latest(registry).decode())

    return app
