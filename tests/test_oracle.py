"""The oracle (Belady's MIN) against a brute force over every eviction choice on small traces."""

import functools
import itertools

import numpy as np
import pytest

from moeinf.bench.simulator import simulate, slots_for
from moeinf.runtime.expert_key import ExpertKey as K
from moeinf.runtime.oracle import NEVER, OraclePolicy, access_sequence, next_use
from moeinf.runtime.trace import make_trace


def brute_force_min_fetches(experts: np.ndarray, slots: int) -> int:
    """Fewest demand fetches over all eviction choices: a layer's experts must all be resident."""
    steps = [
        frozenset(K(layer, int(e)) for e in row[layer] if e >= 0)
        for row in experts
        for layer in range(len(row))
    ]
    steps = [s for s in steps if s]

    @functools.cache
    def best(i: int, state: frozenset) -> int:
        if i == len(steps):
            return 0
        need = steps[i]
        missing = need - state
        over = len(state) + len(missing) - slots
        if over <= 0:
            return len(missing) + best(i + 1, state | need)
        choices = sorted(state - need)
        return len(missing) + min(
            best(i + 1, (state - frozenset(evicted)) | need)
            for evicted in itertools.combinations(choices, over)
        )

    return best(0, frozenset())


@pytest.mark.parametrize("seed", range(8))
def test_oracle_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    L, E, Kk, T = 2, 5, 2, 7
    x = np.stack([np.stack([rng.choice(E, Kk, replace=False) for _ in range(L)]) for _ in range(T)])
    tr = make_trace([x[:4], x[4:]], num_experts=E)
    for capacity in (0.3, 0.5, 0.7):
        slots = slots_for(capacity, L, E, Kk, per_layer=False)
        result = simulate(tr, OraclePolicy(tr.experts, E), capacity=capacity)
        assert result.demand_misses == brute_force_min_fetches(tr.experts, slots), (seed, capacity)


def test_next_use_and_sequence():
    x = np.array([[[0, 1]], [[1, -1]], [[0, 1]]])  # T=3, L=1, K=2
    seq = access_sequence(x, 4)
    assert seq.tolist() == [0, 1, 1, 0, 1]
    assert next_use(seq).tolist() == [3, 2, 4, NEVER, NEVER]


def test_oracle_evicts_furthest_next_use_and_respects_can_evict():
    x = np.array([[[0]], [[1]], [[2]], [[1]], [[0]]])  # one layer, top-1
    p = OraclePolicy(x, 3)
    for e in (0, 1):
        p.on_access(K(0, e), False)
        p.on_insert(K(0, e))
    p.on_access(K(0, 2), False)
    assert p.choose_victim(lambda k: True) == K(0, 0)  # 0 is next used at step 4, 1 at step 3
    assert p.choose_victim(lambda k: k != K(0, 0)) == K(0, 1)
    with pytest.raises(ValueError, match="diverged"):
        p.on_access(K(0, 2), True)


def test_replay_oracle_keys_are_model_layers():
    """A model whose MoE layers are 1 and 2 (layer 0 dense): trace layer i is model layer i + 1."""
    import torch

    from moeinf.runtime.oracle import ReplayOracle

    experts = np.array([[[0], [1]], [[2], [1]], [[0], [3]]])  # [3 tokens, 2 MoE layers, top-1]
    oracle = ReplayOracle(experts, num_experts=4, prefetch_layers=1)
    oracle.plan(np.arange(3), layers=(1, 2))
    w = torch.ones(1, 1)
    for layer, e in ((1, 0), (2, 1)):  # token 0
        oracle.on_route(layer - 1, w, torch.tensor([[e]]))
        oracle.on_accesses([K(layer, e)], missed={K(layer, e)})
        oracle.on_insert(K(layer, e))
    # Next uses: (1, 0) at token 2, (2, 1) at token 1: MIN evicts (1, 0).
    assert oracle.choose_victim(lambda k: True) == K(1, 0)
    # After token 0's last layer, the next layer step is token 1's first MoE layer: model layer 1.
    assert oracle.plan_prefetch(2, [1]) == [K(1, 2)]
    with pytest.raises(RuntimeError, match="plan does not match"):
        oracle.on_route(0, w, torch.tensor([[3]]))  # token 1 routes expert 2 at its first layer
