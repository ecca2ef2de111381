from __future__ import annotations

from pathlib import Path

import pytest

from services.common.settings import ClusterSettings, SettingsError, load_settings


def test_default_round_trips_through_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    ClusterSettings().dump_yaml(path)
    assert load_settings(path) == ClusterSettings()


def test_partial_file_keeps_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: m\ndecode:\n  - {port: 1234}\n  - {port: 1235}\n")
    s = load_settings(path)
    assert s.model.name == "m" and s.model.block_size == 16
    assert [d.port for d in s.decode] == [1234, 1235]


@pytest.mark.parametrize("text,needle", [
    ("model:\n  nmae: x\n", "nmae"),
    ("model:\n  block_size: sixteen\n", "model.block_size"),
    ("decode: {port: 1}\n", "decode"),
    ("- 1\n", "mapping"),
    ("model: [\n", "YAML"),
    ("gateway:\n  preemption: {enabeld: false}\n", "enabeld"),
    ("gateway:\n  preemption: {protected: [urgent]}\n", "unknown class"),
    ("gateway:\n  preemption: {min_class_gap: 0}\n", "min_class_gap"),
    ("gateway:\n  preemption: {max_per_request: -1}\n", "max_per_request"),
])
def test_bad_files_name_the_problem(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(SettingsError, match=needle):
        load_settings(path)


def test_missing_file() -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings("/nonexistent/cluster.yaml")


def test_cluster_secret_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("cluster_secret: s3cret\n")
    assert load_settings(path).cluster_secret == "s3cret"
    path.write_text("cluster_secret: 42\n")
    with pytest.raises(SettingsError, match="cluster_secret"):
        load_settings(path)
