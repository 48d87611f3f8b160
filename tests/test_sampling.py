"""The sampling chain against transformers' logits processors, greedy, seeds, and each filter's effect."""

from __future__ import annotations

import pytest
import torch

from moeinf.errors import BadOption
from moeinf.runtime.sampling import Sampler, SamplingParams

V = 50


def _logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 3  # [V]


def _context() -> torch.Tensor:
    return torch.tensor([3, 7, 7, 11, 3, 42], dtype=torch.long)


def _transformers_chain(params: SamplingParams):
    lp = pytest.importorskip("transformers.generation.logits_process")
    chain = lp.LogitsProcessorList()
    if params.repeat_penalty != 1.0:
        chain.append(lp.RepetitionPenaltyLogitsProcessor(params.repeat_penalty))
    if params.temperature != 1.0:
        chain.append(lp.TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        chain.append(lp.TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        chain.append(lp.TopPLogitsWarper(params.top_p))
    if params.min_p:
        chain.append(lp.MinPLogitsWarper(params.min_p))
    return chain


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.0, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=0.9, min_p=0.1),
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, repeat_penalty=1.3),
        SamplingParams(temperature=1.0, repeat_penalty=0.7),
    ],
)
def test_chain_matches_transformers_processors(params):
    for seed in range(5):
        logits, context = _logits(seed), _context()
        expected = _transformers_chain(params)(context[None], logits[None].clone())[0]
        ours = Sampler(params, "cpu").processed(logits.clone(), context)
        assert torch.equal(torch.isinf(ours), torch.isinf(expected))
        finite = ~torch.isinf(expected)
        torch.testing.assert_close(ours[finite], expected[finite])


def test_greedy_is_argmax_after_the_penalty():
    logits = _logits()
    assert Sampler(SamplingParams()).__call__(logits) == int(logits.argmax())
    best = int(logits.argmax())
    penalised = Sampler(SamplingParams(repeat_penalty=100.0))(logits, torch.tensor([best]))
    assert penalised != best and penalised == int(
        logits.clone().index_fill_(0, torch.tensor([best]), -1e9).argmax()
    )
    assert Sampler(SamplingParams(temperature=5.0, top_k=1)).params.greedy


def test_repeat_last_n_limits_the_window():
    logits = torch.zeros(V)
    logits[5] = 1.0
    out = Sampler(SamplingParams(repeat_penalty=2.0, repeat_last_n=2)).processed(
        logits, torch.tensor([5, 1, 2])
    )
    assert out[5] == 1.0  # 5 is outside the last two tokens
    out = Sampler(SamplingParams(repeat_penalty=2.0)).processed(logits, torch.tensor([5, 1, 2]))
    assert out[5] == 0.5


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    params = SamplingParams(temperature=1.0, seed=1234)
    draws = [[Sampler(params)(_logits(i)) for i in range(30)] for _ in range(2)]
    assert draws[0] == draws[1]
    other = [Sampler(params.replace(seed=99))(_logits(i)) for i in range(30)]
    assert other != draws[0]
    unseeded = Sampler(SamplingParams(temperature=1.0))
    assert unseeded.seed is not None


def test_draws_follow_the_softmax_and_respect_filters():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0] + [-5.0] * (V - 5))
    sampler = Sampler(SamplingParams(temperature=1.0, seed=0))
    counts = torch.bincount(torch.tensor([sampler(logits) for _ in range(4000)]), minlength=V).float()
    torch.testing.assert_close(counts / 4000, logits.softmax(-1), atol=0.03, rtol=0)

    top2 = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=0))
    assert {top2(logits) for _ in range(300)} == {0, 1}
    nucleus = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=0))  # p(0) = 0.52 already
    assert {nucleus(logits) for _ in range(300)} == {0}
    minp = Sampler(SamplingParams(temperature=1.0, min_p=0.3, seed=0))  # keeps p >= 0.3 * p(0): ids 0, 1
    assert {minp(logits) for _ in range(300)} == {0, 1}
    cold = Sampler(SamplingParams(temperature=0.05, seed=0))
    assert {cold(logits) for _ in range(100)} == {0}


def test_from_generation_config_reads_like_transformers():
    assert SamplingParams.from_generation_config({}).greedy
    assert SamplingParams.from_generation_config({"temperature": 0.6, "top_p": 0.9}).greedy  # no do_sample
    params = SamplingParams.from_generation_config(
        {"do_sample": True, "top_p": 0.95, "repetition_penalty": 1.1}
    )
    assert (params.temperature, params.top_k, params.top_p, params.repeat_penalty) == (1.0, 50, 0.95, 1.1)


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-1),
        dict(top_k=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(min_p=2),
        dict(repeat_penalty=0),
    ],
)
def test_invalid_params_are_bad_options(bad):
    with pytest.raises(BadOption):
        SamplingParams(**bad)
