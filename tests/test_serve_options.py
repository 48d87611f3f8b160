"""The server's request parsing without HTTP: ollama options and OpenAI fields onto moeinf's parameters,
keep_alive durations, chat messages, per-request cache statistics, the local-bind check, the queue."""

from __future__ import annotations

import asyncio
import math
import threading

import pytest

from moeinf.cli.serve import is_local
from moeinf.errors import BadOption, BadRequest, QueueFull
from moeinf.runtime.sampling import SamplingParams
from moeinf.server.generation import chat_messages, stats_delta
from moeinf.server.options import ollama_params, openai_params, parse_duration
from moeinf.server.queue import Job, Worker


def test_ollama_options_map_onto_generation_params():
    params = ollama_params(
        {
            "temperature": 0.7,
            "top_k": 40,
            "top_p": 0.9,
            "min_p": 0.05,
            "repeat_penalty": 1.1,
            "repeat_last_n": 64,
            "seed": 3,
            "num_predict": 20,
            "stop": ["\n\n", ""],
            "num_ctx": 512,
            "num_gpu": 99,  # llama.cpp-only: accepted, ignored
        }
    )
    defaults = SamplingParams(temperature=1.0, top_k=50)
    generation = params.generation(defaults)
    assert generation.max_tokens == 20 and generation.stop == ("\n\n",) and params.num_ctx == 512
    assert generation.sampling == SamplingParams(
        temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repeat_penalty=1.1, repeat_last_n=64, seed=3
    )
    # Unset options keep the model's defaults; num_predict <= 0 means no limit (ollama's -1).
    kept = ollama_params({"num_predict": -1, "temperature": 1}).generation(defaults)
    assert kept.max_tokens is None and kept.sampling == SamplingParams(temperature=1.0, top_k=50)
    assert ollama_params(None).generation(defaults).sampling == defaults


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"temperature": "hot"}, BadRequest, "must be a number"),
        ({"seed": 1.5}, BadRequest, "must be an integer"),
        ({"top_k": True}, BadRequest, "boolean"),
        ({"temperature": -1}, BadOption, "temperature"),
        ({"top_p": 0}, BadOption, "top_p"),
        ({"stop": 5}, BadRequest, "stop"),
        ({"num_ctx": 1}, BadOption, "num_ctx"),
        ({"warp": 1}, BadOption, "unknown option 'warp'"),
        ([1], BadRequest, "object"),
    ],
)
def test_invalid_ollama_options_are_refused(options, error, message):
    with pytest.raises(error, match=message):
        ollama_params(options)


def test_openai_fields_map_and_unsupported_ones_are_refused():
    params = openai_params({"temperature": 0, "top_p": 0.5, "max_tokens": 7, "stop": "END", "seed": 1})
    generation = params.generation(SamplingParams(temperature=0.8))
    assert generation.sampling == SamplingParams(temperature=0.0, top_p=0.5, seed=1)
    assert generation.max_tokens == 7 and generation.stop == ("END",)
    assert openai_params({"max_tokens": 7, "max_completion_tokens": 3}).max_tokens == 3
    assert openai_params({"ignore_eos": True, "top_k": 5}).ignore_eos
    for body, message in [
        ({"n": 2}, "n must be 1"),
        ({"temperature": 2.5}, "temperature"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"max_tokens": 0}, "max_tokens"),
    ]:
        with pytest.raises(BadOption, match=message):
            openai_params(body)
    assert (
        openai_params({"presence_penalty": 0, "n": 1, "response_format": {"type": "text"}}).max_tokens is None
    )


def test_keep_alive_durations():
    assert parse_duration("5m") == 300 and parse_duration("1h30m") == 5400 and parse_duration("500ms") == 0.5
    assert parse_duration(30) == 30 and parse_duration("45") == 45 and parse_duration(0) == 0
    assert parse_duration(-1) == math.inf and parse_duration("-1m") == math.inf
    for bad in ("soon", "5x", "", "m5"):
        with pytest.raises(BadOption):
            parse_duration(bad)
    with pytest.raises(BadRequest):
        parse_duration(True)


def test_chat_messages_accept_text_parts_and_refuse_the_rest():
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    messages = chat_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts}])
    assert messages == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
    )
    for bad in (None, [], [{"content": "x"}], [{"role": "user", "content": 5}]):
        with pytest.raises(BadRequest):
            chat_messages(bad)
    with pytest.raises(BadRequest, match="text parts"):
        chat_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_per_request_cache_stats_are_differences():
    before = {"requests": 10, "hits": 5, "misses": 5, "hit_rate": 0.5, "per_layer": {"0": {"requests": 10}}}
    after = {
        "requests": 14,
        "hits": 8,
        "misses": 6,
        "hit_rate": 13 / 24,
        "per_layer": {"0": {"requests": 12}},
    }
    after["per_layer"]["1"] = {"requests": 2}
    delta = stats_delta(before, after)
    assert delta["requests"] == 4 and delta["hits"] == 3 and delta["hit_rate"] == 0.75
    assert delta["per_layer"] == {"0": {"requests": 2}, "1": {"requests": 2}}
    assert stats_delta({}, {}) == {}


def test_local_bind_check():
    assert all(is_local(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.1.2.3"))
    assert not any(is_local(h) for h in ("0.0.0.0", "::", "192.168.1.5", "example.com"))


class _NoModel:
    def idle_timeout(self) -> float | None:
        return None

    def expire(self) -> None: ...

    def unload(self) -> None: ...


def test_worker_runs_jobs_in_order_bounds_the_queue_and_skips_cancelled_jobs():
    async def scenario() -> tuple[list[str], list]:
        worker = Worker(_NoModel(), max_queue=2)
        order: list[str] = []
        gate = threading.Event()

        def body(name: str):
            def run(emit, cancelled) -> None:
                if name == "first":
                    gate.wait(10)
                order.append(name)
                emit(name)

            return run

        worker.start()
        first = worker.submit(Job(body("first")))
        while worker.status()["running"] == 0:
            await asyncio.sleep(0.01)
        second, third = worker.submit(Job(body("second"))), worker.submit(Job(body("third")))
        with pytest.raises(QueueFull):
            worker.submit(Job(body("fourth")))
        second.cancel()  # its client went away while it waited: skipped
        gate.set()
        results = []
        for job in (first, second, third):
            results.append([e async for e in job.events()])
        await asyncio.to_thread(worker.stop)
        return order, results + [worker.status()]

    order, (first, second, third, status) = asyncio.run(scenario())
    assert order == ["first", "third"] and first == ["first"] and second == [] and third == ["third"]
    assert status["completed"] == 2 and status["cancelled"] == 1 and status["waiting"] == 0
