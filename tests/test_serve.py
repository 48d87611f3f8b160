"""`moeinf serve` end to end: the real server (uvicorn on a free 127.0.0.1 port, in a thread) with a tiny
OLMoE checkpoint pulled into its store, driven by real clients: the official `openai` package for /v1/*,
plain httpx for ollama's /api/*, streaming and not. Greedy output equals `moeinf run --raw`; concurrent
clients are answered in order and uncorrupted; a client that disconnects frees the server; a full queue
answers 503 + Retry-After; malformed, oversized and unauthorised requests get 4xx JSON errors.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from moeinf.cli.main import app as cli_app
from moeinf.pull import pull
from moeinf.server.app import ServerConfig, create_app
from moeinf.server.manager import LoadOptions
from moeinf.store import Store
from tests.fixtures.checkpoints import build_checkpoint
from tests.fixtures.hub_server import HubServer

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

PROMPT = "Hello world! The experts route"
LONG = {"num_predict": 3000, "ignore_eos": True}  # keeps the worker busy for seconds (with "olmoe-long")


@contextmanager
def serving(app) -> Iterator[str]:
    """Serve `app` with uvicorn on a free local port in a thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


@pytest.fixture(scope="module")
def home(checkpoint, tmp_path_factory) -> Path:
    """A store with the tiny OLMoE ("olmoe", context 256) and a twin with a context of 4096 ("olmoe-long",
    for requests that must keep the worker busy); two models to switch between."""
    root = tmp_path_factory.mktemp("serve-home")
    store = Store(root)
    pull(str(checkpoint("olmoe")), store=store)
    long = build_checkpoint("olmoe", root.parent / "olmoe-long", seed=1, max_position_embeddings=4096)
    pull(str(long), name="olmoe-long", store=store)
    return root


def config(home: Path, **changes) -> ServerConfig:
    load = LoadOptions(device="cpu", ram_mem="50%")  # the expert cache, so statistics are real
    return ServerConfig(**{"load": load, "home": home, "max_queue": 4, "max_body": 64 * 1024, **changes})


@pytest.fixture(scope="module")
def url(home) -> Iterator[str]:
    with serving(create_app(config(home))) as base:
        yield base


def client(base: str, **kwargs):
    return openai.OpenAI(
        base_url=f"{base}/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0, **kwargs
    )


def ndjson(response: httpx.Response) -> list[dict]:
    return [json.loads(line) for line in response.iter_lines() if line]


def generate(base: str, prompt: str, **body) -> dict:
    payload = {"model": "olmoe", "prompt": prompt, "raw": True, "stream": False, **body}
    response = httpx.post(f"{base}/api/generate", json=payload, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def ps(base: str) -> dict:
    return httpx.get(f"{base}/api/ps", timeout=10).json()


def wait_for(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def run_cli(home: Path, monkeypatch, *args: str, device: str = "cpu") -> dict:
    monkeypatch.setenv("MOEINF_HOME", str(home))
    result = CliRunner().invoke(cli_app, ["run", "olmoe", *args, "--format", "json", "--device", device])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_greedy_output_equals_run_raw_through_both_apis(url, home, monkeypatch):
    expected = run_cli(home, monkeypatch, PROMPT, "--raw", "--max-tokens", "12")
    assert expected["text"]

    whole = generate(url, PROMPT, options={"num_predict": 12})
    assert whole["response"] == expected["text"] and whole["done"] is True
    assert whole["eval_count"] == len(expected["token_ids"])
    assert whole["done_reason"] == ("length" if expected["finish_reason"] == "length" else "stop")
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(whole[key], int) and whole[key] >= 0
    assert whole["total_duration"] > whole["eval_duration"] > 0
    assert whole["prompt_eval_count"] >= 1

    payload = {"model": "olmoe", "prompt": PROMPT, "raw": True, "options": {"num_predict": 12}}
    with httpx.stream("POST", f"{url}/api/generate", json=payload, timeout=60) as response:
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = ndjson(response)
    assert all(not line["done"] for line in lines[:-1]) and lines[-1]["done"] is True
    assert "".join(line["response"] for line in lines) == expected["text"]
    assert lines[-1]["eval_count"] == len(expected["token_ids"])

    api = client(url)
    completion = api.completions.create(model="olmoe", prompt=PROMPT, max_tokens=12, temperature=0)
    assert completion.choices[0].text == expected["text"]
    assert completion.usage.prompt_tokens == len(expected["prompt_token_ids"])
    assert completion.usage.completion_tokens == len(expected["token_ids"])
    chunks = list(
        api.completions.create(model="olmoe", prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected["text"]


def test_chat_routes_equal_run_with_the_chat_template(url, home, monkeypatch):
    expected = run_cli(home, monkeypatch, "Hi there, expert", "--max-tokens", "10", "--system", "Be brief.")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there, expert"}]

    body = {"model": "olmoe", "messages": messages, "stream": False, "options": {"num_predict": 10}}
    answer = httpx.post(f"{url}/api/chat", json=body, timeout=60).json()
    assert answer["message"] == {"role": "assistant", "content": expected["text"]} and answer["done"]
    assert answer["prompt_eval_count"] >= 1 and answer["eval_count"] == len(expected["token_ids"])
    with httpx.stream("POST", f"{url}/api/chat", json={**body, "stream": True}, timeout=60) as response:
        lines = ndjson(response)
    assert "".join(line["message"]["content"] for line in lines) == expected["text"] and lines[-1]["done"]

    api = client(url)
    reply = api.chat.completions.create(model="olmoe", messages=messages, max_tokens=10, temperature=0)
    assert reply.choices[0].message.content == expected["text"]
    assert reply.choices[0].message.role == "assistant" and reply.object == "chat.completion"
    assert reply.usage.prompt_tokens == len(expected["prompt_token_ids"])
    stream = api.chat.completions.create(
        model="olmoe",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected["text"]
    assert chunks[-1].usage.completion_tokens == len(expected["token_ids"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_sampling_options_map_onto_moeinf(url):
    api = client(url)

    def sample(seed: int) -> str:
        reply = api.completions.create(
            model="olmoe", prompt=PROMPT, max_tokens=10, temperature=1.5, top_p=0.95, seed=seed
        )
        return reply.choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) > 1  # the seed (and so sampling) reaches the sampler
    greedy = generate(url, PROMPT, options={"num_predict": 10})["response"]
    stop = greedy[3:5]
    assert len(stop) == 2
    stopped = api.completions.create(model="olmoe", prompt=PROMPT, max_tokens=10, temperature=0, stop=[stop])
    assert stopped.choices[0].text == greedy[: greedy.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    ollama = generate(url, PROMPT, options={"num_predict": 10, "temperature": 0, "stop": [stop]})
    assert ollama["response"] == greedy[: greedy.index(stop)] and ollama["done_reason"] == "stop"


def test_listing_routes(url):
    tags = httpx.get(f"{url}/api/tags").json()["models"]
    assert {m["name"] for m in tags} == {"olmoe", "olmoe-long"}
    entry = next(m for m in tags if m["name"] == "olmoe")
    assert entry["size"] > 0 and len(entry["digest"]) == 64 and entry["details"]["family"] == "olmoe"
    shown = httpx.post(f"{url}/api/show", json={"model": "olmoe"}).json()
    assert shown["model_info"]["general.architecture"] == "olmoe" and "im_start" in shown["template"]
    assert httpx.post(f"{url}/api/show", json={"model": "nope"}).status_code == 404
    assert httpx.post(f"{url}/api/show", json={"model": "olmoe:latest"}).status_code == 200  # ollama's tag
    assert httpx.get(f"{url}/").text == "moeinf is running" and httpx.head(f"{url}/").status_code == 200
    assert httpx.get(f"{url}/api/version").json()["version"]
    assert sorted(m.id for m in client(url).models.list()) == ["olmoe", "olmoe-long"]
    assert client(url).models.retrieve("olmoe").id == "olmoe"


def test_one_model_in_memory_keep_alive_and_cache_stats(url):
    first = generate(url, PROMPT, options={"num_predict": 4})
    cache = first["cache"]
    assert cache["requests"] > 0 and cache["hits"] + cache["misses"] == cache["requests"]
    loaded = ps(url)["models"]
    assert [m["name"] for m in loaded] == ["olmoe"] and loaded[0]["cache"]["requests"] >= cache["requests"]

    generate(url, PROMPT, model="olmoe-long", options={"num_predict": 2})
    assert [m["name"] for m in ps(url)["models"]] == ["olmoe-long"]  # loading another unloaded the first
    assert ps(url)["models"][0]["context_length"] == 4096
    generate(url, PROMPT, model="olmoe-long", options={"num_predict": 2, "num_ctx": 64})
    assert ps(url)["models"][0]["context_length"] == 64  # options.num_ctx reloads with that context
    generate(url, PROMPT, model="olmoe-long", options={"num_predict": 2})
    assert ps(url)["models"][0]["context_length"] == 4096  # and back to the default without it

    generate(url, PROMPT, model="olmoe-long", options={"num_predict": 2}, keep_alive=0)
    wait_for(lambda: ps(url)["models"] == [])  # keep_alive 0: unloaded once idle

    loaded = generate(url, "", model="olmoe", keep_alive="1m")  # ollama: an empty prompt loads the model
    assert loaded["done_reason"] == "load" and loaded["response"] == ""
    assert [m["name"] for m in ps(url)["models"]] == ["olmoe"]
    generate(url, PROMPT, options={"num_predict": 2}, keep_alive="300ms")
    wait_for(lambda: ps(url)["models"] == [])
    unloaded = generate(url, "", model="olmoe", keep_alive=0)
    assert unloaded["done_reason"] == "unload"


def test_concurrent_clients_are_answered_in_order_and_uncorrupted(url):
    prompts = [f"{PROMPT} {word}" for word in ("alpha", "beta", "gamma", "delta")]
    expected = {p: generate(url, p, options={"num_predict": 6})["response"] for p in prompts}
    results: dict[str, tuple[float, str]] = {}

    def ask(prompt: str, **body) -> None:
        answer = generate(url, prompt, **body)
        results[prompt] = (time.monotonic(), answer["response"])

    # The first request keeps the worker busy (and uses the other model) while the rest queue up, one
    # after another (each thread starts once the previous request is seen in the queue).
    first = {"model": "olmoe-long", "options": {"num_predict": 600, "ignore_eos": True}}
    threads = [threading.Thread(target=ask, args=(prompts[0],), kwargs=first)]
    threads += [
        threading.Thread(target=ask, args=(p,), kwargs={"options": {"num_predict": 6}}) for p in prompts[1:]
    ]
    for i, thread in enumerate(threads):
        thread.start()
        if i == 0:
            wait_for(lambda: ps(url)["queue"]["running"] == 1)
        else:
            wait_for(lambda i=i: ps(url)["queue"]["waiting"] == i)
    for thread in threads:
        thread.join(60)
    assert all(results[p][1] == expected[p] for p in prompts[1:])  # nobody got another's tokens
    assert len(results[prompts[0]][1]) > 0
    finished = [results[p][0] for p in prompts]
    assert finished == sorted(finished)  # first come, first served


def test_disconnect_mid_stream_frees_the_server(url):
    before = ps(url)["queue"]["cancelled"]
    payload = {"model": "olmoe-long", "prompt": PROMPT, "raw": True, "options": LONG}
    with httpx.stream("POST", f"{url}/api/generate", json=payload, timeout=60) as response:
        lines = response.iter_lines()
        assert not json.loads(next(lines))["done"]
        assert not json.loads(next(lines))["done"]
    # The client hung up after two tokens: the generation stops and the worker is free again.
    wait_for(lambda: ps(url)["queue"]["cancelled"] == before + 1 and ps(url)["queue"]["running"] == 0)
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up is noticed too
        httpx.post(f"{url}/api/generate", json={**payload, "stream": False}, timeout=0.5)
    wait_for(lambda: ps(url)["queue"]["cancelled"] == before + 2 and ps(url)["queue"]["running"] == 0)
    assert generate(url, PROMPT, options={"num_predict": 2})["done"]


def test_full_queue_answers_503_with_retry_after(home):
    with serving(create_app(config(home, max_queue=1))) as base:
        payload = {"model": "olmoe-long", "prompt": PROMPT, "raw": True, "options": LONG}
        with httpx.stream("POST", f"{base}/api/generate", json=payload, timeout=60) as running:
            lines = running.iter_lines()  # kept: dropping the iterator would close the connection
            next(lines)  # the first request runs
            waiting: list[httpx.Response] = []
            short = {**payload, "stream": False, "options": {"num_predict": 2}}
            thread = threading.Thread(
                target=lambda: waiting.append(httpx.post(f"{base}/api/generate", json=short, timeout=60))
            )
            thread.start()
            wait_for(lambda: ps(base)["queue"]["waiting"] == 1)
            full = httpx.post(f"{base}/api/generate", json=payload, timeout=10)
            assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1
            assert "busy" in full.json()["error"]
            with pytest.raises(openai.APIStatusError) as refused:
                client(base).completions.create(model="olmoe", prompt=PROMPT, max_tokens=2)
            assert refused.value.status_code == 503
        thread.join(60)  # the stream was closed: its generation stops and the waiting one runs
        assert waiting[0].status_code == 200 and waiting[0].json()["done"]


def test_bad_requests_get_4xx_json_errors(url):
    def post(path: str, content: bytes | str, **kwargs) -> httpx.Response:
        return httpx.post(f"{url}{path}", content=content, timeout=30, **kwargs)

    cases = [
        ("/api/generate", b'{"model": "olmoe", "prompt": ', 400, "malformed JSON"),
        ("/api/generate", b"[1, 2]", 400, "JSON object"),
        ("/api/generate", b"", 400, "empty"),
        ("/api/generate", json.dumps({"model": "nope", "prompt": "x"}), 404, "not found"),
        ("/api/generate", json.dumps({"prompt": "x"}), 400, "'model' is required"),
        ("/api/generate", json.dumps({"model": "olmoe", "prompt": 5}), 400, "'prompt' must be a string"),
        ("/api/chat", json.dumps({"model": "olmoe", "messages": [{"content": "x"}]}), 400, "role"),
    ]
    options = [
        ({"temperature": "hot"}, "must be a number"),
        ({"top_p": 1.5}, "top_p"),
        ({"num_predict": 2.5}, "must be an integer"),
        ({"warp_speed": 9}, "unknown option"),
    ]
    for opts, message in options:
        body = {"model": "olmoe", "prompt": "x", "options": opts}
        cases.append(("/api/generate", json.dumps(body), 400, message))
    cases.append(
        (
            "/api/generate",
            json.dumps({"model": "olmoe", "prompt": "x", "keep_alive": "soon"}),
            400,
            "keep_alive",
        )
    )
    for path, content, status, message in cases:
        response = post(path, content)
        assert response.status_code == status, (content, response.text)
        assert message in response.json()["error"], (content, response.json())

    too_long = " ".join(["experts"] * 400)  # beyond the 256-token context of the fixture
    response = post("/api/generate", json.dumps({"model": "olmoe", "prompt": too_long, "raw": True}))
    assert response.status_code == 400 and "context" in response.json()["error"]
    response = post("/api/generate", json.dumps({"model": "olmoe", "prompt": too_long, "stream": True}))
    assert response.status_code == 400  # found before the stream starts: still a plain error

    big = json.dumps({"model": "olmoe", "prompt": "x" * (100 * 1024)})
    assert post("/api/generate", big).status_code == 413
    chunked = post("/api/generate", (part.encode() for part in [big[:40000], big[40000:]]))  # no length
    assert chunked.status_code == 413 and "limit" in chunked.json()["error"]

    api = client(url)
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as bad:
        api.completions.create(model="olmoe", prompt=too_long)
    assert "context" in bad.value.message
    with pytest.raises(openai.BadRequestError):
        api.completions.create(model="olmoe", prompt="x", temperature=3.0)
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model="olmoe", messages=[{"role": "user", "content": "x"}], n=2)
    response = post("/v1/completions", b"{not json")
    assert response.status_code == 400 and "malformed" in response.json()["error"]["message"]
    assert generate(url, PROMPT, options={"num_predict": 1})["done"]  # still serving


def test_api_key_is_required_when_set(home):
    with serving(create_app(config(home, api_key="sekret"))) as base:
        assert httpx.get(f"{base}/api/tags").status_code == 401
        wrong = httpx.get(f"{base}/api/tags", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "API key" in wrong.json()["error"]
        ok = httpx.get(f"{base}/api/tags", headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
        with pytest.raises(openai.AuthenticationError):
            client(base, api_key="nope").models.list()
        reply = client(base, api_key="sekret").completions.create(model="olmoe", prompt=PROMPT, max_tokens=2)
        assert reply.choices[0].text


def test_serve_command_wires_flags_and_environment(home, monkeypatch):
    """The CLI layer: flags and MOEINF_API_KEY become the server's configuration (served for real below)."""
    captured = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: captured.update(app=app, **kw))
    monkeypatch.setenv("MOEINF_HOME", str(home))
    monkeypatch.setenv("MOEINF_API_KEY", "from-env")
    args = [
        "serve",
        "--host",
        "0.0.0.0",
        "--port",
        "1",
        "--model",
        "olmoe",
        "--ram-mem",
        "50%",
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 0, result.output
    assert "Warning" in result.stderr and "0.0.0.0" in result.stderr
    assert captured["host"] == "0.0.0.0" and captured["port"] == 1
    with serving(captured["app"]) as base:
        assert httpx.get(f"{base}/api/tags").status_code == 401
        headers = {"Authorization": "Bearer from-env"}
        wait_for(lambda: httpx.get(f"{base}/api/ps", headers=headers).json()["models"] != [])  # --model
        answer = httpx.post(
            f"{base}/api/generate",
            json={"prompt": PROMPT, "raw": True, "stream": False, "options": {"num_predict": 2}},
            headers=headers,
        )
        assert answer.status_code == 200 and answer.json()["model"] == "olmoe"  # the default model

    missing = CliRunner().invoke(cli_app, ["serve", "--model", "not-pulled"])
    assert missing.exit_code != 0 and "not found" in missing.stderr
    bad = CliRunner().invoke(cli_app, ["serve", "--policy", "nonsense"])
    assert bad.exit_code == 2 and "policy" in bad.stderr


def test_record_trace_writes_each_models_routing(home, tmp_path, monkeypatch):
    """--record-trace FOLDER: every request's routing, prompt part as the server counted it, in one file
    per model and server run (for `moeinf trace simulate`); a file instead of a folder is refused."""
    from moeinf.runtime.trace import read_trace

    captured = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: captured.update(app=app, **kw))
    monkeypatch.setenv("MOEINF_HOME", str(home))
    folder = tmp_path / "traces"
    args = ["serve", "--record-trace", str(folder), "--ram-mem", "50%", "--device", "cpu"]
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 0, result.output
    with serving(captured["app"]) as base:
        answers = [generate(base, p, options={"num_predict": 3}) for p in ("one two three", "four five six")]
    files = list(folder.glob("olmoe-*.npz"))
    assert len(files) == 1
    trace = read_trace(files[0])
    assert trace.num_requests == 2 and trace.meta["model"] == "olmoe"
    assert trace.meta["prefill_tokens"] == [a["prompt_eval_count"] for a in answers]
    assert trace.decode_only().num_tokens == sum(a["eval_count"] - 1 for a in answers)
    (tmp_path / "file").write_text("x")
    bad = CliRunner().invoke(cli_app, ["serve", "--record-trace", str(tmp_path / "file")])
    assert bad.exit_code == 2 and "is a file" in bad.stderr


def test_pull_streams_progress_then_delete(url, checkpoint, monkeypatch):
    with HubServer() as hub:
        hub.add_repo("test/olmoe-hub", checkpoint("olmoe"))
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        with httpx.stream(
            "POST", f"{url}/api/pull", json={"model": "test/olmoe-hub"}, timeout=60
        ) as response:
            assert response.status_code == 200
            lines = ndjson(response)
        missing = httpx.post(f"{url}/api/pull", json={"model": "test/no-such-repo", "stream": False})
        assert missing.status_code == 404 and "error" in missing.json()
        with httpx.stream("POST", f"{url}/api/pull", json={"model": "test/no-such-repo"}) as response:
            failed = ndjson(response)  # as ollama: the stream had started, so the error is its last line
        assert failed[0] == {"status": "pulling manifest"} and "error" in failed[-1]
    assert lines[0] == {"status": "pulling manifest"} and lines[-1] == {"status": "success"}
    assert any("total" in line and line["completed"] > 0 for line in lines)
    names = {m["name"] for m in httpx.get(f"{url}/api/tags").json()["models"]}
    new = (names - {"olmoe", "olmoe-long"}).pop()
    assert generate(url, PROMPT, model=new, options={"num_predict": 2})["done"]

    assert httpx.request("DELETE", f"{url}/api/delete", json={"model": new}).status_code == 200
    assert new not in {m["name"] for m in httpx.get(f"{url}/api/tags").json()["models"]}
    assert all(m["name"] != new for m in ps(url)["models"])  # deleting a loaded model unloads it
    gone = httpx.request("DELETE", f"{url}/api/delete", json={"model": new})
    assert gone.status_code == 404 and "not found" in gone.json()["error"]
    local = httpx.post(f"{url}/api/pull", json={"model": str(checkpoint("olmoe")), "stream": False})
    assert local.status_code == 400 and "local folder" in local.json()["error"]


def test_serve_without_fastapi_or_uvicorn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if the optional extra were not installed
    result = CliRunner().invoke(cli_app, ["serve"])
    assert result.exit_code == 1 and "pip install 'moeinf[serve]'" in result.stderr
    assert "uvicorn" in result.stderr
