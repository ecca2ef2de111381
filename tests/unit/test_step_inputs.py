"""Step inputs: block-table rows kept across steps equal the sequences' tables."""

from __future__ import annotations

import random

from services.engine.scheduler import ScheduledSeq
from services.engine.sequence import SamplingParams, Sequence
from services.engine.step_inputs import BlockTableRows

WIDTH = 12


def test_rows_follow_growth_preemption_and_reuse() -> None:
    rng = random.Random(0)
    seqs = [Sequence(f"r{i}", [1, 2, 3], SamplingParams()) for i in range(6)]
    rows = BlockTableRows(capacity=8, max_blocks=WIDTH)
    for step in range(60):
        for s in seqs:
            if rng.random() < 0.3 and len(s.block_table) < WIDTH:
                s.block_table.append(rng.randrange(1000))  # a running table only grows
            if rng.random() < 0.05:  # preempted: back later with other blocks
                s.num_preemptions += 1
                s.block_table = [rng.randrange(1000) for _ in range(len(s.block_table))]
        if step % 10 == 9:  # some finish, new ones come: rows run out and start over
            seqs[rng.randrange(len(seqs))] = Sequence(f"n{step}", [1], SamplingParams())
        batch = [ScheduledSeq(s, 1, 0) for s in rng.sample(seqs, rng.randint(1, len(seqs)))]
        got = rows.gather(batch)
        for i, x in enumerate(batch):
            n = len(x.seq.block_table)
            assert got[i, :n].tolist() == x.seq.block_table, (step, i)
        assert got.shape == (len(batch), WIDTH)
