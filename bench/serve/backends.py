"""Where `bench serve` sends requests: a SplitServe gateway over gRPC, or any
OpenAI-compatible HTTP endpoint through the official ``openai`` client."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Outcome:
    ok: bool = True
    error: str = ""
    token_times: list[float] = field(default_factory=list)  # seconds after sending, per token
    token_ids: list[int] = field(default_factory=list)  # empty when the backend gives text only
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0


class Backend(Protocol):
    async def generate(self, prompt: list[int], max_tokens: int, session_id: str,
                       last_turn: bool = True) -> Outcome: ...

    async def close(self) -> None: ...


class GrpcBackend:
    def __init__(self, address: str, model: str | None, api_key: str | None = None,
                 cache_salt: str = "", timeout_s: float | None = None) -> None:
        import grpc

        from splitserve.v1 import generation_pb2_grpc

        self._channel = grpc.aio.insecure_channel(address)
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)
        self._model = model
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._salt, self._timeout_s = cache_salt, timeout_s

    async def model(self) -> str:
        if self._model is None:
            from splitserve.v1 import generation_pb2

            models = await self._stub.ListModels(generation_pb2.ListModelsRequest(),
                                                 metadata=self._metadata, timeout=10)
            if not models.models:
                raise ValueError("the gateway serves no model")
            self._model = models.models[0].id
        return self._model

    async def generate(self, prompt: list[int], max_tokens: int, session_id: str,
                       last_turn: bool = True) -> Outcome:
        """One turn; the session's KV stays pinned in the store for the next turn until
        its last one ends it."""
        import grpc

        from splitserve.v1 import common_pb2, generation_pb2

        req = generation_pb2.GenerateRequest(
            model=await self.model(), session_id=session_id, end_session=last_turn,
            prompt_token_ids=generation_pb2.TokenIds(ids=prompt), cache_salt=self._salt,
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        )
        out = Outcome()
        start = time.perf_counter()
        try:
            async for resp in self._stub.Generate(req, metadata=self._metadata,
                                                  timeout=self._timeout_s):
                now = time.perf_counter() - start
                out.token_times += [now] * len(resp.token_ids)
                out.token_ids += resp.token_ids
                if resp.HasField("usage"):
                    out.prompt_tokens = resp.usage.prompt_tokens
                    out.cached_tokens = resp.usage.cached_tokens
        except grpc.aio.AioRpcError as e:
            out.ok, out.error = False, f"{e.code().name}: {e.details()}"
        out.output_tokens = len(out.token_ids)
        return out

    async def close(self) -> None:
        await self._channel.close()


class OpenAIBackend:
    """``/v1/completions`` with token-id prompts, streamed, usage in the last chunk."""

    def __init__(self, base_url: str, model: str | None, api_key: str | None = None,
                 cache_salt: str = "", timeout_s: float | None = None) -> None:
        from openai import AsyncOpenAI

        limit = {"timeout": timeout_s} if timeout_s else {}  # else the client's default
        self._client = AsyncOpenAI(base_url=base_url, api_key=api_key or "none", max_retries=0,
                                   **limit)
        self._model = model
        self._extra = {"ignore_eos": True} | ({"cache_salt": cache_salt} if cache_salt else {})

    async def model(self) -> str:
        if self._model is None:
            page = await self._client.models.list()
            if not page.data:
                raise ValueError("the endpoint lists no model")
            self._model = page.data[0].id
        return self._model

    async def generate(self, prompt: list[int], max_tokens: int, session_id: str,
                       last_turn: bool = True) -> Outcome:
        import openai

        out = Outcome()
        start = time.perf_counter()
        try:
            stream = await self._client.completions.create(
                model=await self.model(), prompt=prompt, max_tokens=max_tokens,
                temperature=0.0, stream=True, stream_options={"include_usage": True},
                extra_body=self._extra,
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    out.token_times.append(time.perf_counter() - start)
                if chunk.usage is not None:
                    out.prompt_tokens = chunk.usage.prompt_tokens
                    out.output_tokens = chunk.usage.completion_tokens
                    details = getattr(chunk.usage, "prompt_tokens_details", None)
                    out.cached_tokens = getattr(details, "cached_tokens", 0) or 0
        except openai.APIError as e:
            out.ok, out.error = False, f"{type(e).__name__}: {e}"
        out.output_tokens = out.output_tokens or len(out.token_times)
        return out

    async def close(self) -> None:
        await self._client.close()


def make_backend(kind: str, address: str, model: str | None, api_key: str | None,
                 cache_salt: str = "", timeout_s: float | None = None) -> Backend:
    """``cache_salt`` (when set) goes with every request: prefixes cached under another
    salt (an earlier run's) are not hits. ``timeout_s`` bounds each request."""
    if kind == "grpc":
        return GrpcBackend(address, model, api_key, cache_salt, timeout_s)
    if kind == "openai":
        return OpenAIBackend(address, model, api_key, cache_salt, timeout_s)
    raise ValueError(f"unknown backend {kind!r}; known: grpc, openai")
