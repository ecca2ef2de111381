"""Offline batch generation: ``LLM(model=...).generate(prompts, params)``."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

from tqdm.auto import tqdm

from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.sequence import SamplingParams


class LLM:
    def __init__(self, model: str, use_tqdm: bool = True, **engine_kwargs: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs), use_tqdm=use_tqdm)
        self.tokenizer = None
        path = self.engine.tokenizer_path
        if path is not None:
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer.json: pass token ids")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Seq[int]) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def generate(
        self,
        prompts: Seq[Seq[int]] | Seq[str],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[dict[str, Any]]:
        """Generate for every prompt (token ids or text); results in prompt order as
        ``{"token_ids": [...], "text": str | None, "finish_reason": str,
        "num_cached_tokens": int}``."""
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        engine = self.engine
        results: dict[str, dict[str, Any]] = {}
        ids: list[str] = []
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            tokens = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
            rid = f"llm-{id(self)}-{i}"
            engine.add_request(rid, tokens, p)
            results[rid] = {"token_ids": [], "finish_reason": None, "num_cached_tokens": 0}
            ids.append(rid)
        with tqdm(total=len(ids), desc="generating", unit="seq", disable=not use_tqdm) as bar:
            while engine.has_unfinished():
                for o in engine.step():
                    r = results[o.request_id]
                    r["token_ids"].extend(o.new_token_ids)
                    r["num_cached_tokens"] = o.num_cached_tokens
                    if o.finished:
                        r["finish_reason"] = o.finish_reason
                        bar.update(1)
        out = []
        for rid in ids:
            r = results[rid]
            r["text"] = self.decode(r["token_ids"])
            out.append(r)
        return out
