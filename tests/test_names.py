"""Model references and store names: valid forms parse, malformed ones fail with InvalidModelName."""

import random
import string

import pytest

from moeinf.errors import InvalidModelName, MoeinfError, UnknownAlias
from moeinf.names import catalog, parse_source, resolve_name, sanitize_name, validate_name


def test_catalog_has_required_aliases():
    entries = catalog()
    required = [
        "mixtral",
        "mixtral:8x22b",
        "deepseek-v2-lite",
        "deepseek-v3",
        "qwen1.5-moe",
        "qwen3-moe",
        "olmoe",
    ]
    for alias in required:
        entry = entries[alias]
        assert entry.repo is not None and "/" in entry.repo and entry.revision
        assert entry.family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")
    assert entries["mixtral"].repo == "mistralai/Mixtral-8x7B-Instruct-v0.1"


def test_packaged_alias_is_a_local_folder():
    import moeinf.demo

    ref = parse_source("demo")
    assert (ref.kind, ref.alias, ref.default_name) == ("local", "demo", "demo")
    assert ref.path == moeinf.demo.checkpoint_dir()


def test_alias_parses_to_hub_ref_with_alias_name():
    ref = parse_source("mixtral:8x22b")
    assert (ref.kind, ref.repo, ref.alias, ref.default_name) == (
        "hub",
        "mistralai/Mixtral-8x22B-Instruct-v0.1",
        "mixtral:8x22b",
        "mixtral:8x22b",
    )
    assert parse_source("OLMoE").alias == "olmoe"
    assert parse_source("mixtral:latest").alias == "mixtral"


@pytest.mark.parametrize(
    "source, repo, revision",
    [
        ("org/repo", "org/repo", "main"),
        ("Org-1/Repo.Name_2@v1.0", "Org-1/Repo.Name_2", "v1.0"),
        ("org/repo:refs/pr/3", "org/repo", "refs/pr/3"),
        (
            "org/repo@0123456789abcdef0123456789abcdef01234567",
            "org/repo",
            "0123456789abcdef0123456789abcdef01234567",
        ),
    ],
)
def test_hub_refs(source, repo, revision):
    ref = parse_source(source)
    assert (ref.kind, ref.repo, ref.revision) == ("hub", repo, revision)


def test_hub_default_name_is_lowercased_repo():
    assert parse_source("mistralai/Mixtral-8x7B-v0.1").default_name == "mixtral-8x7b-v0.1"


@pytest.mark.parametrize(
    "source",
    [
        "",
        "   ",
        "org/repo ",
        "org /repo",
        "org/re po",
        "org/",
        "/repo-that-does-not-exist-anywhere",
        "org/repo/extra",
        "org/../repo",
        "../nonexistent-dir-xyz",
        "org/repo@",
        "org/repo@bad..rev",
        "org/repo@rev with space",
        "org/repo@rev/",
        "org/repo@-rev",
        "org/-repo",
        "org/repo.",
        "org/re--po",
        "org/repo\n",
        "org/repo\x00",
    ],
)
def test_malformed_sources_are_refused(source):
    with pytest.raises(InvalidModelName):
        parse_source(source)


def test_unknown_bare_name_lists_aliases(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnknownAlias, match="mixtral"):
        parse_source("no-such-alias")


def test_local_directory(tmp_path, monkeypatch):
    ckpt = tmp_path / "My Checkpoint"
    ckpt.mkdir()
    ref = parse_source(str(ckpt))
    assert ref.kind == "local" and ref.path == ckpt.resolve()
    assert ref.default_name == "my-checkpoint"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plain").mkdir()
    assert parse_source("plain").kind == "local"
    assert parse_source("./plain").path == (tmp_path / "plain").resolve()


@pytest.mark.parametrize("name", ["mixtral", "mixtral:8x22b", "a", "deepseek-v2-lite", "x.y_z-1"])
def test_valid_store_names(name):
    assert validate_name(name) == name
    assert validate_name(name.upper()) == name


@pytest.mark.parametrize(
    "name",
    ["", " ", "..", "../x", "a/b", "a\\b", "a b", ".hidden", "-x", "a:b:c", "a:", "x" * 97, "a..b", "é"],
)
def test_invalid_store_names(name):
    with pytest.raises(InvalidModelName):
        validate_name(name)


def test_resolve_name_maps_sources_to_store_names():
    assert resolve_name("mixtral") == "mixtral"
    assert resolve_name("mixtral:latest") == "mixtral"
    assert resolve_name("mistralai/Mixtral-8x7B-Instruct-v0.1") == "mixtral-8x7b-instruct-v0.1"


def test_random_strings_never_crash():
    """Fuzz: any string either parses or raises a MoeinfError, never another exception."""
    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + "./@:-_ ~\\\t\n\x00é"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        for fn in (parse_source, validate_name, resolve_name):
            try:
                fn(text)
            except MoeinfError:
                pass
        assert sanitize_name(text or "x")  # sanitize always yields a valid name
