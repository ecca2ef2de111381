"""The store's contract keeps imports one way: ``kvstore`` builds on ``services``
(the contract, the data plane, the common server pieces); nothing in ``services``
or ``gateway`` imports ``kvstore``; the contract itself imports nothing of ours but
the protos."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def _offenders(folders: list[str], bad: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{path.relative_to(ROOT)}: {name}"
        for folder in folders
        for path in (ROOT / folder).rglob("*.py")
        for name in _imports(path)
        if name.split(".")[0] in bad or name.startswith(bad)
    )


def test_services_and_gateway_never_import_the_store() -> None:
    assert _offenders(["services", "gateway"], ("kvstore",)) == []


def test_the_contract_imports_only_the_protos() -> None:
    ours = ("services", "kvstore", "gateway", "bench")
    assert _offenders(["services/transfer/contract"], ours) == []
