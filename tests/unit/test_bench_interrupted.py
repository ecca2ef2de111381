"""What the migration and preemption benchmarks share: their cluster settings come from
one YAML plus shortcuts, and the gap they report is the interruption's."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.interrupted import add_cluster_arguments, base_settings, longest_gap


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_cluster_arguments(parser.add_argument_group())
    return parser.parse_args(list(argv))


def test_settings_come_from_the_config_then_the_shortcuts(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("model: {path: dummy:qwen3-0.6b, kv_cache_memory_gb: 3, max_num_seqs: 4}\n"
                      "kvstore: {cpu_bytes: 1073741824}\n")
    s = base_settings(_args("--config", str(config), "--device", "cuda"))
    assert (s.model.path, s.model.device, s.model.dtype) == ("dummy:qwen3-0.6b", "cuda",
                                                             "bfloat16")
    assert (s.model.kv_cache_memory_gb, s.model.max_num_seqs) == (3, 4)
    assert s.kvstore.cpu_bytes == 1 << 30
    s = base_settings(_args("--config", str(config), "--model", "dummy:tiny-llama",
                            "--kv-cache-gb", "0.5", "--dtype", "float16"))
    assert (s.model.path, s.model.dtype, s.model.kv_cache_memory_gb) == (
        "dummy:tiny-llama", "float16", 0.5)
    default = base_settings(_args())
    assert (default.model.path, default.model.device) == ("dummy:tiny-llama", "cpu")


def test_the_gap_is_measured_from_the_interruption_on() -> None:
    # token 2 waits for the prompt's KV hand-off (0.5 s), token 6 for the interruption (0.3 s)
    times = [0.0, 0.5, 0.51, 0.52, 0.53, 0.83, 0.84]
    assert longest_gap(times) == 0.5
    assert abs(longest_gap(times, after=4) - 0.3) < 1e-9
