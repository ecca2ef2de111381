"""Token sampling: greedy, temperature, top-k, top-p, per-request seed.

A seeded request samples its i-th output token from a CPU generator seeded with
``seed * 1_000_003 + i`` (exponential race: ``argmax(p / Exp(1))``), so the token
is a pure function of (seed, output index, logits) — the same whichever engine
computes which part of the request.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.engine.sequence import SamplingParams

SEED_STRIDE = 1_000_003


def token_seed(seed: int, output_index: int) -> int:
    return (seed * SEED_STRIDE + output_index) % (1 << 64)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set logits outside each row's top-k / top-p nucleus to -inf.

    ``top_k``: [S] long (vocab size = off); ``top_p``: [S] float (1.0 = off)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    drop = ranks >= top_k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
    drop |= before >= top_p[:, None]
    drop[:, 0] = False  # always keep the best token
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


class Sampler:
    def __init__(self, seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    @torch.no_grad()
    def __call__(
        self,
        logits: torch.Tensor,  # [S, vocab]
        params: Sequence[SamplingParams],
        output_indices: Sequence[int],
    ) -> list[int]:
        """One token per row; ``output_indices[r]`` is the index of the output token
        row ``r`` samples (0 for the first generated token)."""
        logits = logits.float()
        n = logits.shape[0]
        tokens = [0] * n
        greedy = [r for r in range(n) if params[r].greedy]
        if greedy:
            best = logits[greedy].argmax(dim=-1).tolist()
            for r, t in zip(greedy, best, strict=True):
                tokens[r] = t
        rand = [r for r in range(n) if not params[r].greedy]
        if not rand:
            return tokens
        vocab = logits.shape[-1]
        dev = logits.device
        temps = torch.tensor([params[r].temperature for r in rand], device=dev)
        top_k = torch.tensor(
            [params[r].top_k if params[r].top_k > 0 else vocab for r in rand], device=dev
        )
        top_p = torch.tensor([params[r].top_p for r in rand], device=dev)
        scaled = logits[rand] / temps[:, None]
        if any(params[r].top_k > 0 or params[r].top_p < 1.0 for r in rand):
            scaled = filter_logits(scaled, top_k, top_p)
        probs = scaled.softmax(dim=-1)
        unseeded = [i for i, r in enumerate(rand) if params[r].seed is None]
        if unseeded:
            p = probs[unseeded]
            q = torch.empty_like(p).exponential_(generator=self.generator).clamp_(min=1e-30)
            for i, t in zip(unseeded, (p / q).argmax(dim=-1).tolist(), strict=True):
                tokens[rand[i]] = t
        cpu_probs = None
        for i, r in enumerate(rand):
            seed = params[r].seed
            if seed is None:
                continue
            if cpu_probs is None:
                cpu_probs = probs.cpu()
            g = torch.Generator(device="cpu")
            g.manual_seed(token_seed(seed, output_indices[r]))
            p = cpu_probs[i]
            q = torch.empty_like(p).exponential_(generator=g).clamp_(min=1e-30)
            tokens[r] = int((p / q).argmax())
        return tokens
