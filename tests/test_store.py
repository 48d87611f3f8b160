"""Store reading rules: only complete models of this format are opened; locks; removal."""

import pytest

from moeinf import manifest as manifest_io
from moeinf.errors import CorruptModel, IncompleteModel, ModelNotFound, StoreLocked, UnsupportedStoreVersion
from moeinf.pull import pull
from moeinf.store import Store


@pytest.fixture
def model(checkpoint):
    return pull(str(checkpoint("qwen2_moe")), name="q2")


def test_open_by_name(model):
    store = Store()
    assert store.open("q2").path == model.path
    assert store.open("Q2").name == "q2"
    assert store.open("q2").expert_path(1, 7).name == "E007.safetensors"
    assert (
        store.open("q2").dense_path.is_file()
        and (store.open("q2").tokenizer_dir / "tokenizer.json").is_file()
    )


def test_missing_and_incomplete_models(model):
    store = Store()
    with pytest.raises(ModelNotFound, match="moeinf pull"):
        store.open("absent")
    store.partial_dir("half").mkdir(parents=True)
    with pytest.raises(IncompleteModel):
        store.open("half")
    assert [m.name for m in store.list()] == ["q2"]


def test_other_format_version_is_refused(model):
    text = (model.path / "manifest.yaml").read_text()
    (model.path / "manifest.yaml").write_text(text.replace("format_version: 1", "format_version: 99"))
    with pytest.raises(UnsupportedStoreVersion, match="pull"):
        Store().open("q2")
    assert Store().list() == []


def test_malformed_manifest_is_corrupt(model):
    (model.path / "manifest.yaml").write_text("format_version: 1\nname: q2\n")
    with pytest.raises(CorruptModel):
        manifest_io.load(model.path)


def test_lock_excludes_a_second_holder(model):
    store = Store()
    with store.lock("q2"):
        with pytest.raises(StoreLocked):
            with store.lock("q2", wait=False):
                pass
        with pytest.raises(StoreLocked):
            store.remove("q2")
    store.remove("q2")
    assert not model.path.exists() and store.list() == []


def test_pull_replaces_a_model_of_another_format_version(model, checkpoint):
    text = (model.path / "manifest.yaml").read_text()
    (model.path / "manifest.yaml").write_text(text.replace("format_version: 1", "format_version: 99"))
    events = []
    again = pull(str(checkpoint("qwen2_moe")), name="q2", progress=events.append)
    assert any("replacing" in e.message for e in events)
    assert again.verify() == [] and Store().open("q2").manifest.format_version == 1
