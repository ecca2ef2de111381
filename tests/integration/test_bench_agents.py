"""`bench agents` end to end on the CPU: with reuse one agent computes the shared prefix
and every other finds it (in an engine's cache or the store); with ``prefix_reuse`` and
prefix caching off no prompt token comes from a cache."""

from __future__ import annotations

import argparse

from bench.agents import add_arguments, run


def test_agents_find_the_shared_prefix_only_with_reuse(tmp_path) -> None:
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--agents", "3", "--prefix-len", "64", "--task-len", "8",
                         "--output-len", "2", "--json", str(tmp_path / "agents.json")])
    result = run(args)
    assert result["with"]["cached_tokens"] >= (3 - 1) * 64
    assert result["without"]["cached_tokens"] == 0
    assert result["without"]["store_get_mb"] > 0  # the decode worker read the prompts' KV
    assert (tmp_path / "agents.json").exists()
