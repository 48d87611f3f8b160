"""LRU and LFU policies: victims follow recency / frequency and never violate `can_evict`."""

import pytest

from moeinf.errors import BadOption
from moeinf.runtime.expert_key import ExpertKey as K
from moeinf.runtime.policy import LfuPolicy, LruPolicy, make_policy


def test_lru_evicts_least_recently_used():
    p = LruPolicy()
    for k in (K(0, 0), K(0, 1), K(1, 0)):
        p.on_insert(k)
    p.on_access(K(0, 0), hit=True)
    assert p.choose_victim(lambda k: True) == K(0, 1)
    assert p.choose_victim(lambda k: k != K(0, 1)) == K(1, 0)
    p.on_evict(K(0, 1))
    assert p.choose_victim(lambda k: k != K(1, 0)) == K(0, 0)
    assert p.choose_victim(lambda k: False) is None


def test_lfu_evicts_least_frequent_then_least_recent():
    p = LfuPolicy()
    for k in (K(0, 0), K(0, 1), K(0, 2)):
        p.on_insert(k)
    for k in (K(0, 0), K(0, 0), K(0, 1), K(0, 2)):
        p.on_access(k, hit=True)
    assert p.choose_victim(lambda k: True) == K(0, 1)  # count 1, older than K(0, 2)
    p.on_evict(K(0, 1))
    assert p.choose_victim(lambda k: k != K(0, 2)) == K(0, 0)
    # Counts survive eviction: K(0, 1) comes back with its history.
    p.on_insert(K(0, 1))
    p.on_access(K(0, 1), hit=False)
    assert p.choose_victim(lambda k: True) == K(0, 2)


def test_make_policy():
    assert make_policy("lru").name == "lru"
    assert make_policy("lfu").name == "lfu"
    with pytest.raises(BadOption, match="unknown policy"):
        make_policy("random")
    with pytest.raises(BadOption, match="needs the future"):
        make_policy("oracle")  # `run` has no future to give it; bench under replay builds its own
