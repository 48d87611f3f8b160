"""The expert cache on CUDA: GPU slots in front of pinned RAM slots, copies on their own stream.

Skipped without a GPU; `scripts/gpu_session.sh` runs these on a lent GPU machine.
"""

import random
import threading

import pytest
import torch

from moeinf.runtime.expert_cache import ExpertCache
from moeinf.runtime.expert_key import ExpertKey
from moeinf.runtime.policy import make_policy
from tests.test_expert_cache import EXPERTS, LAYERS, expected, make_store

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
GPU = torch.device("cuda")


def make_cache(path_of, layout, slots, host_slots, dtype, policy="lru"):
    return ExpertCache(
        path_of,
        layout,
        slots=slots,
        policy=make_policy(policy),
        device=GPU,
        dtype=dtype,
        host_slots=host_slots,
        host_policy=make_policy(policy),
    )


def check(cache, layer, ids, path_of, dtype):
    for expert, weights in cache.experts(layer, ids):
        # Compute on the weights as the model would (on the current stream), then compare.
        got = [(w.float() * 1).cpu() for w in weights]
        for g, want in zip(got, expected(path_of, layer, expert, dtype), strict=True):
            assert torch.equal(g, want.float()), (layer, expert)


@pytest.mark.parametrize(
    "stored,compute", [("bfloat16", torch.bfloat16), ("float32", torch.float32), ("float32", torch.bfloat16)]
)
@pytest.mark.parametrize("slots,host_slots", [(2, 4), (4, 24), (24, 24)])
def test_gpu_tier_exact(tmp_path, stored, compute, slots, host_slots):
    layout, path_of = make_store(tmp_path, stored)
    cache = make_cache(path_of, layout, slots, host_slots, compute)
    rng = random.Random(0)
    try:
        for _ in range(15):
            for layer in range(LAYERS):
                check(cache, layer, rng.sample(range(EXPERTS), 2), path_of, compute)
        total = cache.stats.total()
        assert total.hits + total.misses == total.requests
        assert total.bytes_h2d == total.misses * layout.data_bytes
        assert total.bytes_read <= total.bytes_h2d  # the RAM tier saves re-reads from disk
        if host_slots >= LAYERS * EXPERTS:
            assert total.bytes_read <= LAYERS * EXPERTS * layout.data_bytes
    finally:
        cache.close()


def test_gpu_prefetch_stress(tmp_path):
    layout, path_of = make_store(tmp_path, "bfloat16")
    cache = make_cache(path_of, layout, 5, 8, torch.bfloat16)
    stop = threading.Event()

    def churn():
        r = random.Random(1)
        while not stop.is_set():
            cache.prefetch([ExpertKey(r.randrange(LAYERS), r.randrange(EXPERTS)) for _ in range(4)])
            if r.random() < 0.5:
                cache.cancel_prefetches()

    thread = threading.Thread(target=churn)
    thread.start()
    rng = random.Random(3)
    try:
        for _ in range(100):
            check(cache, rng.randrange(LAYERS), rng.sample(range(EXPERTS), 2), path_of, torch.bfloat16)
    finally:
        stop.set()
        thread.join()
        cache.close()
