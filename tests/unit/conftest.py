"""Unit tests run on the CPU: Triton kernels run there through Triton's interpreter.

TRITON_INTERPRET must be set before Triton is first imported (its standard library
is compiled at import), so it is set here, at collection, and only where there is
no GPU: on a CUDA machine the kernels are tested compiled (tests/gpu).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
