"""Shared test fixtures: an isolated MOEINF_HOME / HF_HOME per test, tiny checkpoints, a local hub.

Every test runs with MOEINF_HOME and HF_HOME in its own temporary folder and without HF_TOKEN, so no
test reads or writes the user's store or token. Checkpoints are built once per session
(`checkpoint("mixtral")`, `checkpoint("mixtral_sharded")`), and one local hub server per session
serves each of them as repo `test/<name>` (`hub_endpoint` sets HF_ENDPOINT for the test).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fixtures.checkpoints import FAMILIES, build_checkpoint
from tests.fixtures.hub_server import HubServer

# name -> (family, build_checkpoint keyword arguments); "mixtral_sharded" has an index.json and
# shards small enough that some experts straddle two files.
CHECKPOINTS: dict[str, tuple[str, dict]] = {
    **{family: (family, {}) for family in FAMILIES},
    "mixtral_sharded": ("mixtral", {"max_shard_size": "40KB"}),
}


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """MOEINF_HOME and HF_HOME under this test's tmp_path; no token, no telemetry."""
    home = tmp_path / "moeinf-home"
    monkeypatch.setenv("MOEINF_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return home


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`checkpoint(name)` -> folder of a tiny hub-format checkpoint (built once per session)."""
    root = tmp_path_factory.mktemp("checkpoints")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            family, kwargs = CHECKPOINTS[name]
            built[name] = build_checkpoint(family, root / name, seed=0, **kwargs)
        return built[name]

    return get


@pytest.fixture(scope="session")
def hub_server(checkpoint: Callable[[str], Path]) -> Iterator[HubServer]:
    """One local hub for the session, serving every CHECKPOINTS entry as `test/<name>`."""
    with HubServer() as hub:
        for name in CHECKPOINTS:
            hub.add_repo(f"test/{name}", checkpoint(name))
        yield hub


@pytest.fixture
def hub(hub_server: HubServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """The session hub with HF_ENDPOINT pointing at it; fault injection is reset after the test."""
    monkeypatch.setenv("HF_ENDPOINT", hub_server.endpoint)
    hub_server.requests.clear()
    yield hub_server
    hub_server.drop_after.clear()
    hub_server.stall_after.clear()
