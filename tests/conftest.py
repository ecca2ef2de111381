"""Shared fixtures: tiny random-weight HF model directories (made once per session).

Where there is no GPU, Triton kernels run on the CPU through Triton's interpreter
(tests/unit); on a CUDA machine they are tested compiled (tests/gpu). TRITON_INTERPRET
must be set before Triton is first imported (its standard library is compiled at
import), so it is set here, before any test module is collected: a GPU test module
that imports a kernel at collection would otherwise import Triton uninterpreted first.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.fixtures.models import make_tiny_model  # noqa: E402


def _tiny(tmp_path_factory: pytest.TempPathFactory, family: str) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}"), family)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 512)."""
    return _tiny(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def tiny_llama3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with llama3 rope scaling."""
    return _tiny(tmp_path_factory, "llama3")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2 (q/k/v bias, tied embeddings)."""
    return _tiny(tmp_path_factory, "qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3 (q/k norm, head_dim 32, tied embeddings)."""
    return _tiny(tmp_path_factory, "qwen3")
