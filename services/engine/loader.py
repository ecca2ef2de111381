"""Weights: from a local HF directory (safetensors) or random (``dummy:<shape>``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from services.engine.config import EngineConfig
from services.engine.kv_cache import DTYPE_BY_NAME
from services.engine.models import DecoderForCausalLM, build_model

log = logging.getLogger(__name__)

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files, from model.safetensors.index.json when there is one."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        names = sorted(set(weight_map.values()))
        files = [model_dir / n for n in names]
        for f in files:
            if not f.is_file():
                raise ValueError(f"weight file {f.name} named in {index.name} is missing")
        if not files:
            raise ValueError(f"{index} lists no weight files")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weight files in {model_dir}")
    return files


@torch.no_grad()
def load_weights(model: DecoderForCausalLM, model_dir: Path, use_tqdm: bool = True) -> None:
    """Copy every HF tensor into its (possibly fused) parameter; check names and shapes."""
    files = safetensors_files(model_dir)
    params = dict(model.named_parameters())
    wmap = model.hf_weight_map()
    loaded: set[str] = set()
    tied = model.config.tie_word_embeddings
    with tqdm(total=len(wmap), desc="loading weights", unit="tensor", disable=not use_tqdm) as bar:
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                        continue
                    target = wmap.get(name)
                    if target is None:
                        log.warning("ignoring unexpected tensor %s in %s", name, path.name)
                        continue
                    pname, start, rows = target
                    dst = params[pname].data.narrow(0, start, rows)
                    t = f.get_tensor(name)
                    if tuple(t.shape) != tuple(dst.shape):
                        raise ValueError(
                            f"tensor {name} in {path.name} has shape {tuple(t.shape)}, "
                            f"expected {tuple(dst.shape)}"
                        )
                    dst.copy_(t.to(dst.dtype))
                    if name not in loaded:
                        loaded.add(name)
                        bar.update(1)
    missing = sorted(set(wmap) - loaded)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"missing tensor(s) in {model_dir}: {', '.join(missing[:5])}{more}")


@torch.no_grad()
def init_dummy_weights(model: DecoderForCausalLM, seed: int, std: float = 0.02) -> None:
    """Seeded random weights, generated in place on the parameters' device and dtype."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.normal_(0.0, std, generator=gen)


def load_model(config: EngineConfig, use_tqdm: bool = True) -> DecoderForCausalLM:
    """Build the network for ``config`` on its device and fill the weights."""
    config.finalize()
    device = torch.device(config.device)
    model = build_model(
        config.model_config,
        config.max_model_len,
        config.attention_backend,
        DTYPE_BY_NAME[config.dtype],
        device,
    )
    if config.is_dummy:
        init_dummy_weights(model, config.seed)
    else:
        load_weights(model, Path(config.model), use_tqdm=use_tqdm)
    return model
