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


def test_every_section_is_aligned() -> None:
    """Triton specialises kernels on 16-byte pointer alignment: every integer section
    of every layout starts aligned, whatever the numbers of decodes and chunks."""
    import torch

    from services.engine.step_inputs import StepInputs

    inputs = StepInputs(max_tokens=256, max_seqs=7, max_blocks=9, block_size=4,
                        device=torch.device("cpu"), chunk_tokens=64, chunk_seqs=5)
    params = SamplingParams(max_tokens=1)
    rng = random.Random(0)
    for nd, np_ in ((1, 1), (3, 2), (5, 0), (0, 3)):
        scheduled = []
        for i in range(nd + np_):
            n = rng.randint(2, 30)
            seq = Sequence(f"s{i}", [1] * n, params)
            seq.block_table = list(range(10 * i, 10 * i + -(-n // 4)))
            start = n - 1 if i < nd else rng.randint(0, n - 1)
            scheduled.append(ScheduledSeq(seq, n - start, start))
        batch = inputs.fill_general(scheduled)
        m = batch.meta
        views = [batch.input_ids, batch.positions, batch.sample_rows, m.slot_mapping,
                 m.decode_block_tables, m.decode_seq_lens, m.prefill_block_tables,
                 m.prefill_query_start, m.prefill_seq_lens]
        for rows in (1, 4, 7):
            d = inputs.decode_views(rows)
            views += [d.input_ids, d.positions, d.meta.slot_mapping,
                      d.meta.decode_block_tables, d.meta.decode_seq_lens]
        c = inputs.chunk_views(32)
        views += [c.input_ids, c.positions, c.meta.slot_mapping, c.meta.prefill_block_tables,
                  c.meta.prefill_query_start, c.meta.prefill_seq_lens,
                  inputs.fill_chunks(scheduled[:5], 64)]
        for v in views:
            if v is not None:
                assert v.data_ptr() % 16 == 0


def test_decodes_fed_from_the_device_in_every_layout() -> None:
    """A decode whose input token the step before sampled (not on the host yet)
    reads it from that step's ids on the device, in each layout."""
    import torch

    from services.engine.step_inputs import StepInputs

    inputs = StepInputs(max_tokens=64, max_seqs=6, max_blocks=8, block_size=4,
                        device=torch.device("cpu"), chunk_tokens=32, chunk_seqs=6)
    params = SamplingParams(max_tokens=9)
    scheduled = []
    for i, n in enumerate((5, 9, 3, 7)):
        seq = Sequence(f"s{i}", [100 + 10 * i + k for k in range(n)], params)
        seq.block_table = list(range(8 * i, 8 * i + 4))
        if i % 2 == 0:  # its last token is still on the device: it decodes after it
            seq.num_pending_tokens = 1
            scheduled.append(ScheduledSeq(seq, 1, n))
        else:
            scheduled.append(ScheduledSeq(seq, 1, n - 1))
    scheduled.append(ScheduledSeq(Sequence("p", [7, 8, 9], params), 3, 0))  # a prompt
    scheduled[-1].seq.block_table = [40]
    assert [s.input_from_device for s in scheduled] == [True, False, True, False, False]
    sampled = torch.tensor([11, 22, 33], dtype=torch.int64)  # the step before's ids
    rows, src = [0, 2], [2, 0]
    want = [33, 118, 11, 136, 7, 8, 9]
    inputs.feed_from_device(rows, src, sampled)
    assert inputs.fill_general(scheduled).input_ids.tolist() == want
    inputs.feed_from_device(rows, src, sampled)
    inputs.fill_chunks(scheduled, 16)
    assert inputs.chunk_views(16).input_ids.tolist() == want + [0] * 9
    inputs.feed_from_device(rows, src, sampled)
    inputs.fill_decode(scheduled[:4], 6)
    assert inputs.decode_views(6).input_ids.tolist() == want[:4] + [0, 0]
