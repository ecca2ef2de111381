"""`python3 -m bench.store_rpc` end to end: a store process whose full gpu tier spills
every device put, each size of put timed (the bench raises if one did not spill), and
an RPC with nothing to do."""

from __future__ import annotations

import pytest

from bench.store_rpc import SIZES, main


def test_store_rpc_times_every_size_of_spilled_put(capsys: pytest.CaptureFixture) -> None:
    main(["--repeat", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "spilled device puts of 4 KiB blocks, median of 2:"
    assert lines[1].startswith("  an RPC with nothing to do (a health check):")
    assert float(lines[1].split()[-2]) > 0
    assert [int(line.split()[0]) for line in lines[2:]] == list(SIZES)
    assert all("BeginPut" in line and "CommitPut" in line for line in lines[2:])
