"""Host time to prepare one step's inputs (``StepInputs``), no model and no device:
``python3 -m bench.step_prep``. Batches of 1, 64 and 256 decodes with contexts
U(100, 1536), median of 200 fills, in the CUDA-graph decode layout and the general one."""

from __future__ import annotations

import random
import statistics
import time

import torch

from services.engine.scheduler import ScheduledSeq
from services.engine.sequence import SamplingParams, Sequence
from services.engine.step_inputs import StepInputs

BLOCK = 16


def _decodes(n: int, rng: random.Random) -> list[ScheduledSeq]:
    out, next_block = [], 0
    for i in range(n):
        length = rng.randint(100, 1536)
        seq = Sequence(f"r{i}", [rng.randrange(1000) for _ in range(length)], SamplingParams())
        blocks = -(-length // BLOCK)
        seq.block_table = list(range(next_block, next_block + blocks))
        next_block += blocks
        out.append(ScheduledSeq(seq, 1, length - 1))
    return out


def main() -> None:
    rng = random.Random(0)
    for n in (1, 64, 256):
        batch = _decodes(n, rng)
        inputs = StepInputs(8192, 256, 1536 // BLOCK, BLOCK, torch.device("cpu"))
        fills = (("decode layout", inputs.fill_decode, (batch, n)),
                 ("general layout", inputs.fill_general, (batch,)))
        for name, fill, args in fills:
            fill(*args)
            times = []
            for _ in range(200):
                t = time.perf_counter()
                fill(*args)
                times.append(time.perf_counter() - t)
            print(f"{n:4d} decodes, {name}: {1e3 * statistics.median(times):.3f} ms")


if __name__ == "__main__":
    main()
