"""Token sampling: greedy, temperature, top-k, top-p, per-request seed.

A seeded request samples its i-th output token with the exponential race
``argmax(p / Exp(1))``, whose Exp(1) draws come from a counter-based generator
keyed by ``seed * 1_000_003 + i`` and the vocabulary index, so the token is a
pure function of (seed, output index, logits) — the same whichever engine
computes which part of the request, and computed on the logits' device.
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


def _signed(x: int) -> int:
    """A 64-bit pattern as torch's int64."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >> 63 else x


_GAMMA = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _splitmix64(z: torch.Tensor) -> torch.Tensor:
    z = z + _GAMMA
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def seeded_exponentials(keys: Sequence[int], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(keys), vocab] Exp(1) draws, a pure function of (key, column): the same on
    every device and in every batch (a counter-based generator, no state)."""
    k = torch.tensor([_signed(key) for key in keys], dtype=torch.int64, device=device)
    z = _splitmix64(k[:, None] * _MIX1 + torch.arange(vocab, device=device)[None, :])
    u = (_shr(z, 11).double() + 0.5) * 2.0**-53  # in (0, 1)
    return (-torch.log(u)).float()


class Sampler:
    """Samples on the logits' device; the only device->host copy is the token ids."""

    def __init__(self, seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(
        self,
        logits: torch.Tensor,  # [S, vocab]
        params: Sequence[SamplingParams],
        output_indices: Sequence[int],
    ) -> list[int]:
        """One token per row; ``output_indices[r]`` is the index of the output token
        row ``r`` samples (0 for the first generated token)."""
        return self.sample(logits, params, output_indices).tolist()

    @torch.no_grad()
    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        output_indices: Sequence[int],
    ) -> torch.Tensor:
        """As ``__call__``, the tokens left on the logits' device ([S] int64)."""
        logits = logits.float()
        best = logits.argmax(dim=-1)
        if all(p.greedy for p in params):
            return best
        return self._sample(logits, best, params, output_indices)

    def _sample(
        self,
        logits: torch.Tensor,
        best: torch.Tensor,
        params: Sequence[SamplingParams],
        output_indices: Sequence[int],
    ) -> torch.Tensor:
        vocab, dev = logits.shape[-1], logits.device

        def column(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, pin_memory=dev.type == "cuda").to(
                dev, non_blocking=True
            )

        temps = column([p.temperature or 1.0 for p in params], torch.float32)
        scaled = logits / temps[:, None]
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            top_k = column([p.top_k if p.top_k > 0 else vocab for p in params], torch.int64)
            top_p = column([p.top_p for p in params], torch.float32)
            scaled = filter_logits(scaled, top_k, top_p)
        probs = scaled.softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        seeded = [r for r, p in enumerate(params) if p.seed is not None and not p.greedy]
        if seeded:
            keys = [token_seed(params[r].seed, output_indices[r]) for r in seeded]
            noise[seeded] = seeded_exponentials(keys, vocab, dev)
        sampled = (probs / noise.clamp_(min=1e-30)).argmax(dim=-1)
        greedy = column([p.greedy for p in params], torch.bool)
        return torch.where(greedy, best, sampled)
