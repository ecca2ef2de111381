"""EngineConfig / ModelConfig parsing, dummy shapes, loader errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.engine.config import EngineConfig, load_model_config, parse_model_config
from services.engine.engine import LLMEngine
from services.engine.models.layers import rope_inv_freq
from services.engine.shapes import SHAPES


def engine(model: str | Path, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model), **kw), use_tqdm=False)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_parse_tiny_dirs(tiny_llama_dir: Path, tiny_qwen3_dir: Path) -> None:
    llama = load_model_config(str(tiny_llama_dir))
    assert llama.architecture == "LlamaForCausalLM"
    assert (llama.num_layers, llama.num_heads, llama.num_kv_heads, llama.head_dim) == (2, 4, 2, 16)
    assert llama.eos_token_ids == (257,)
    qwen3 = load_model_config(str(tiny_qwen3_dir))
    assert qwen3.qk_norm and qwen3.head_dim == 32 and qwen3.tie_word_embeddings


def test_old_style_rope_fields_and_eos_list() -> None:
    cfg = dict(SHAPES["llama-3.1-8b"])
    mc = parse_model_config(cfg)
    assert mc.rope_theta == 500000.0 and mc.rope_scaling["rope_type"] == "llama3"
    assert mc.eos_token_ids == (128001, 128008, 128009)
    assert mc.head_dim == 128
    q2 = parse_model_config(dict(SHAPES["qwen2.5-7b"]))
    assert q2.qkv_bias and not q2.o_bias


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_every_dummy_shape_parses(name: str) -> None:
    cfg = EngineConfig(model=f"dummy:{name}").finalize()
    assert cfg.model_id == f"dummy:{name}"
    assert cfg.max_model_len == cfg.model_config.max_position_embeddings


def test_llama3_rope_matches_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    hf_cfg = LlamaConfig(
        hidden_size=4096, num_attention_heads=32, rope_theta=500000.0, rope_scaling=scaling
    )
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    ours = rope_inv_freq(128, 500000.0, scaling)
    torch.testing.assert_close(ours, ref)
    lin = rope_inv_freq(128, 10000.0, {"rope_type": "linear", "factor": 4.0})
    torch.testing.assert_close(lin * 4, rope_inv_freq(128, 10000.0, None))


def test_unknown_architecture(tmp_path: Path, tiny_llama_dir: Path) -> None:
    d = copy_model(tiny_llama_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as e:
        engine(d)
    assert "LlamaForCausalLM" in str(e.value) and "Qwen3ForCausalLM" in str(e.value)


def test_unknown_rope_type() -> None:
    cfg = dict(SHAPES["tiny-llama"], rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="yarn"):
        parse_model_config(cfg)


def test_missing_weight_file(tmp_path: Path, tiny_llama_dir: Path) -> None:
    d = copy_model(tiny_llama_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="safetensors"):
        engine(d)


def test_index_names_a_missing_shard(tmp_path: Path, tiny_llama_dir: Path) -> None:
    d = copy_model(tiny_llama_dir, tmp_path / "m")
    tensors = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    save_file({k: tensors[k] for k in names[:half]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in names[half:]}, str(d / "model-00002-of-00002.safetensors"))
    shard = "model-0000{}-of-00002.safetensors"
    wmap = {k: shard.format(1 if i < half else 2) for i, k in enumerate(names)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    engine(d, num_kv_blocks=8)  # sharded checkpoints load
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors"):
        engine(d)


def test_missing_and_misshaped_tensor(tmp_path: Path, tiny_llama_dir: Path) -> None:
    d = copy_model(tiny_llama_dir, tmp_path / "m")
    tensors = load_file(str(d / "model.safetensors"))
    name = "model.layers.1.self_attn.k_proj.weight"
    save_file({k: v for k, v in tensors.items() if k != name}, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        engine(d)
    tensors[name] = tensors[name][:-1]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match="shape"):
        engine(d)


def test_max_model_len_too_large(tiny_llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="4096") as e:
        EngineConfig(model=str(tiny_llama_dir), max_model_len=4096).finalize()
    assert "1024" in str(e.value)
    cfg = EngineConfig(model=str(tiny_llama_dir), max_model_len=256).finalize()
    assert cfg.max_model_len == 256


def test_bad_fields() -> None:
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(model="dummy:tiny-llama", dtype="float64").finalize()
    with pytest.raises(ValueError, match="device"):
        EngineConfig(model="dummy:tiny-llama", device="tpu").finalize()
    with pytest.raises(ValueError, match="nope"):
        EngineConfig(model="dummy:nope").finalize()
    with pytest.raises(ValueError, match="directory"):
        EngineConfig(model="/does/not/exist").finalize()


def test_model_id_and_tokenizer_path(tiny_llama_dir: Path) -> None:
    cfg = EngineConfig(model=str(tiny_llama_dir)).finalize()
    assert cfg.model_id == tiny_llama_dir.name
    assert cfg.tokenizer_path == tiny_llama_dir / "tokenizer.json"
    assert EngineConfig(model="dummy:tiny-qwen3").finalize().tokenizer_path is None


def test_dummy_weights_are_seeded() -> None:
    a = engine("dummy:tiny-qwen3", num_kv_blocks=8, seed=1).runner.model
    b = engine("dummy:tiny-qwen3", num_kv_blocks=8, seed=1).runner.model
    c = engine("dummy:tiny-qwen3", num_kv_blocks=8, seed=2).runner.model
    w = "model.layers.0.self_attn.qkv_proj.weight"
    pa, pb, pc = (dict(m.named_parameters())[w] for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert abs(float(pa.std()) - 0.02) < 0.005


def test_dummy_bf16_model_runs() -> None:
    e = engine("dummy:tiny-llama", dtype="bfloat16", num_kv_blocks=16)
    assert e.kv_cache.tensor.dtype == torch.bfloat16
    assert next(e.runner.model.parameters()).dtype == torch.bfloat16
    from services.engine.sequence import SamplingParams

    e.add_request("a", list(range(40)), SamplingParams(max_tokens=3, ignore_eos=True))
    toks = []
    while e.has_unfinished():
        for o in e.step():
            toks += o.new_token_ids
    assert len(toks) == 3


def test_kv_cache_sizing(tiny_llama_dir: Path) -> None:
    e = engine(tiny_llama_dir, kv_cache_memory_gb=0.001)
    assert e.block_nbytes == 2 * 2 * 16 * 2 * 16 * 4  # layers, K/V, bs, kv heads, dim, fp32
    assert e.num_kv_blocks == int(0.001 * (1 << 30)) // e.block_nbytes
    e = engine(tiny_llama_dir, max_num_seqs=2, max_model_len=64)
    assert e.num_kv_blocks == 2 * 4 + 1  # the CPU default: enough for max_num_seqs
