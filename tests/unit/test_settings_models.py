"""Several models in one cluster config: ``models:``, each worker entry's ``model``, and
the checks that say what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.models import GatewayModel
from gateway.tokenizer import TokenizerError
from services.common.settings import (
    ClusterSettings,
    ModelSettings,
    SettingsError,
    WorkerEndpoint,
    load_settings,
)
from services.common.worker import worker_settings

TWO_MODELS = """
models:
  - {name: a, path: "dummy:tiny-llama", max_model_len: 256, num_kv_blocks: 64}
  - {name: b, path: "dummy:tiny-qwen3", block_size: 8}
prefill: [{port: 1}, {port: 2, model: b}]
decode: [{port: 3, model: a}, {port: 4, model: b}]
"""


def _load(tmp_path: Path, text: str) -> ClusterSettings:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    return load_settings(path)


def test_the_single_model_section_is_unchanged() -> None:
    s = load_settings(None)
    assert s.models == [] and s.served_models() == [s.model]
    assert s.model_of(s.decode[0]) is s.model
    assert "models" not in s.to_dict() and s.to_dict()["model"]["name"] == "tiny-llama"


def test_workers_serve_the_model_their_entry_names(tmp_path: Path) -> None:
    s = _load(tmp_path, TWO_MODELS)
    assert [m.name for m in s.served_models()] == ["a", "b"]
    assert s.model is s.models[0]  # the default model is the first
    assert [s.model_of(ep).name for ep in s.prefill + s.decode] == ["a", "b", "a", "b"]
    own = worker_settings(s, s.prefill[1]).model
    assert (own.name, own.path, own.block_size) == ("b", "dummy:tiny-qwen3", 8)
    assert worker_settings(s, s.decode[0]).model.num_kv_blocks == 64


def test_a_models_config_round_trips_through_yaml(tmp_path: Path) -> None:
    s = _load(tmp_path, TWO_MODELS)
    s.dump_yaml(tmp_path / "again.yaml")
    again = load_settings(tmp_path / "again.yaml")
    assert again == s and "model" not in again.to_dict()


@pytest.mark.parametrize(("text", "message"), [
    (TWO_MODELS.replace("{port: 4, model: b}", "{port: 4, model: c}"),
     r"decode\[1\]\.model: 'c' is not a model of this cluster; name one of: a, b"),
    ("models: [{name: a}, {name: a, path: 'dummy:tiny-qwen3'}]",
     r"models\[1\]\.name: 'a' is given twice"),
    ("model: {name: a}\nmodels: [{name: b}]", "both 'model:' and 'models:' are set"),
    ("models: [{name: ''}]", r"models\[0\]\.name: empty"),
    ("model: {name: a}\nprefill: [{model: b}]", r"prefill\[0\]\.model: 'b' is not a model"),
    ("models: [{name: a, dtype: 3}]", r"models\[0\]\.dtype: expected str"),
], ids=["unknown", "duplicate", "both", "unnamed", "unknown-single", "bad-option"])
def test_bad_model_configs_say_what_to_fix(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        _load(tmp_path, text)


def test_settings_built_in_code_are_checked_too() -> None:
    with pytest.raises(SettingsError, match="both 'model:' and 'models:'"):
        ClusterSettings(model=ModelSettings(name="x"), models=[ModelSettings(name="y")])
    with pytest.raises(SettingsError, match=r"decode\[0\]\.model: 'z'"):
        ClusterSettings(models=[ModelSettings(name="y")], decode=[WorkerEndpoint(model="z")])


def test_each_served_model_names_its_blocks_and_builds_its_tokenizer_once() -> None:
    a = GatewayModel(ModelSettings(name="a", path="dummy:tiny-llama"))
    b = GatewayModel(ModelSettings(name="b", path="dummy:tiny-qwen3"))
    ids = list(range(40))
    assert a.name_blocks(ids) != b.name_blocks(ids)  # one store holds both models' blocks
    assert len(a.name_blocks(ids)) == 40 // a.block_size
    assert a._tokenizer is None  # built at first use, not when the gateway starts
    assert a.tokenizer is a.tokenizer


def test_a_served_models_tokenizer_is_checked_at_start_and_read_at_first_use(
        tmp_path: Path) -> None:
    model = ModelSettings(name="m", path="dummy:tiny-llama", tokenizer=str(tmp_path / "t.json"))
    with pytest.raises(TokenizerError, match="no tokenizer at"):
        GatewayModel(model)  # the gateway does not start
    (tmp_path / "t.json").write_text("{not json")
    served = GatewayModel(model)
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        served.tokenizer  # noqa: B018 (the server answers INTERNAL, naming the model)
