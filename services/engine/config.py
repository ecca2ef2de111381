"""Engine and model configuration (no torch here).

``EngineConfig`` is what a user sets; ``ModelConfig`` is what a HF ``config.json``
(or a named dummy shape, see ``shapes.py``) says about the network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from services.engine.shapes import get_shape

DTYPES = ("float32", "float16", "bfloat16")
DEVICES = ("cpu", "cuda")
DUMMY_PREFIX = "dummy:"

# architecture -> family flags (qk_norm, q/k/v bias forced on)
ARCHITECTURES: dict[str, dict[str, bool]] = {
    "LlamaForCausalLM": {"qk_norm": False, "qkv_bias": False},
    "MistralForCausalLM": {"qk_norm": False, "qkv_bias": False},
    "Qwen2ForCausalLM": {"qk_norm": False, "qkv_bias": True},
    "Qwen3ForCausalLM": {"qk_norm": True, "qkv_bias": False},
}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    """The shape of a decoder-only transformer, parsed from a HF config.json."""

    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # normalised: has "rope_type", never "default"
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k
    qkv_bias: bool = False  # Qwen2: bias on q/k/v (Llama's attention_bias adds o_proj too)
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    torch_dtype: str | None = None  # what the checkpoint says, informational


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling) from either the old (rope_theta + rope_scaling) or the
    transformers-5 (rope_parameters) layout."""
    params = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    theta = cfg.get("rope_theta")
    if isinstance(params, dict):
        if theta is None:
            theta = params.get("rope_theta")
        if scaling is None:
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    theta = float(theta) if theta is not None else 10000.0
    if not scaling:
        return theta, None
    scaling = dict(scaling)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"unsupported rope scaling type {rope_type!r}; supported: {list(ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None
    scaling["rope_type"] = rope_type
    scaling.pop("type", None)
    if "factor" not in scaling:
        raise ValueError(f"rope scaling {rope_type!r} needs a 'factor': {scaling}")
    return theta, scaling


def parse_model_config(cfg: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a HF config.json dict."""
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise ValueError(
            f"unsupported model architecture {archs or cfg.get('model_type')!r}; "
            f"supported: {sorted(ARCHITECTURES)}"
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}; only 'silu'")
    flags = ARCHITECTURES[arch]
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or hidden // heads
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    theta, scaling = _rope(cfg)
    attn_bias = bool(cfg.get("attention_bias", False))
    sliding = cfg.get("sliding_window")
    if arch == "Qwen2ForCausalLM" and not cfg.get("use_sliding_window", False):
        sliding = None
    if arch == "Qwen3ForCausalLM" and not cfg.get("use_sliding_window", False):
        sliding = None
    return ModelConfig(
        architecture=arch,
        hidden_size=hidden,
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        intermediate_size=int(cfg["intermediate_size"]),
        vocab_size=int(cfg["vocab_size"]),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        eos_token_ids=eos_ids,
        bos_token_id=cfg.get("bos_token_id"),
        qk_norm=flags["qk_norm"],
        qkv_bias=flags["qkv_bias"] or attn_bias,
        o_bias=attn_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        sliding_window=int(sliding) if sliding else None,
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
    )


def load_model_config(model: str) -> ModelConfig:
    """ModelConfig of ``dummy:<shape>`` or of a local HF directory."""
    if model.startswith(DUMMY_PREFIX):
        return parse_model_config(get_shape(model[len(DUMMY_PREFIX) :]))
    path = Path(model)
    if not path.is_dir():
        raise ValueError(f"model {model!r} is neither 'dummy:<shape>' nor a local directory")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"no config.json in model directory {path}")
    return parse_model_config(json.loads(cfg_file.read_text()))


ATTENTION_BACKENDS = ("auto", "torch", "triton")
PREEMPTION_MODES = ("swap", "recompute")


@dataclass(kw_only=True)
class EngineOptions:
    """The engine's tunables: defined once here, set from the cluster YAML (the
    ``model`` section) or by keyword. Defaults work on a laptop and on a GPU."""

    dtype: str = "float32"
    device: str = "cpu"
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: from kv_cache_memory_gb / measured memory
    kv_cache_memory_gb: float | None = None
    gpu_memory_utilization: float = 0.90  # share of the GPU for weights, activations, KV
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # token budget per step (chunked prefill)
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    # when the KV cache runs out, a preempted sequence's KV is copied to host memory and
    # copied back when it resumes (swap), or dropped and computed again (recompute);
    # swap falls back to recompute beyond swap_space_gb of swapped KV
    preemption_mode: str = "swap"
    swap_space_gb: float = 4.0
    # auto (triton on CUDA where the head size allows, torch elsewhere) | torch | triton
    attention_backend: str = "auto"
    enforce_eager: bool = False  # True: no CUDA graphs for decode steps (CUDA + triton only)
    # schedule and prepare step N+1 while step N runs. None (auto): on for CUDA, off on
    # the CPU, where a step runs as it is launched and nothing would overlap
    async_scheduling: bool | None = None
    seed: int = 0


ENGINE_OPTION_NAMES = tuple(f.name for f in fields(EngineOptions))


@dataclass
class EngineConfig(EngineOptions):
    """Everything the engine needs to know; validated and completed by ``finalize``."""

    model: str  # a local HF directory or "dummy:<shape>"
    model_id: str | None = None  # served name (part of every block hash); default derived
    model_config: ModelConfig | None = field(default=None, repr=False)

    def finalize(self) -> EngineConfig:
        """Check fields, parse the model config, fill derived defaults. Returns self."""
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device.split(":")[0] not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {ATTENTION_BACKENDS}, "
                f"got {self.attention_backend!r}"
            )
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(
                f"preemption_mode must be one of {PREEMPTION_MODES}, got {self.preemption_mode!r}"
            )
        if self.swap_space_gb < 0:
            raise ValueError(f"swap_space_gb must be >= 0, got {self.swap_space_gb}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if self.model_config is None:
            self.model_config = load_model_config(self.model)
        mc = self.model_config
        if self.attention_backend == "auto":
            self.attention_backend = self._auto_backend(mc.head_dim)
        if self.async_scheduling is None:
            self.async_scheduling = self.device.startswith("cuda")
        limit = mc.max_position_embeddings
        if mc.sliding_window is not None:
            limit = min(limit, mc.sliding_window)  # sliding-window attention is not implemented
        if self.max_model_len is None:
            self.max_model_len = limit
        elif self.max_model_len > limit:
            raise ValueError(
                f"max_model_len={self.max_model_len} is larger than the model's maximum "
                f"length {limit} ({self.model})"
            )
        if self.model_id is None:
            if self.model.startswith(DUMMY_PREFIX):
                self.model_id = self.model
            else:
                self.model_id = Path(self.model).resolve().name
        return self

    def _auto_backend(self, head_dim: int) -> str:
        """triton on CUDA when its kernels take the head size (a power of two >= 16)."""
        pow2 = head_dim >= 16 and head_dim & (head_dim - 1) == 0
        return "triton" if self.device.startswith("cuda") and pow2 else "torch"

    @property
    def is_dummy(self) -> bool:
        return self.model.startswith(DUMMY_PREFIX)

    @property
    def tokenizer_path(self) -> Path | None:
        """``tokenizer.json`` beside the weights, or None (dummy models, or none there)."""
        if self.is_dummy:
            return None
        p = Path(self.model) / "tokenizer.json"
        return p if p.is_file() else None
