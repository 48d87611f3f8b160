"""The expert cache on CPU: exact data under any budget, accounting, priorities, faults.

Expert files are written in the store's format (aligned header, gate/up/down back to back) and every
expert the cache hands over is compared with what safetensors reads from the same file.
"""

import random
import threading
from itertools import islice
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moeinf.errors import CorruptExpertFile
from moeinf.runtime.expert_cache import ExpertCache
from moeinf.runtime.expert_key import ExpertKey
from moeinf.runtime.expert_store import DATA_OFFSET, ExpertLayout, ExpertReader
from moeinf.runtime.policy import make_policy
from moeinf.tensorfile import DTYPE_CODES, OutTensor, data_start, from_bytes, write_tensor_file

LAYERS, EXPERTS, HIDDEN, EXPERT_DIM = 3, 8, 48, 40


def write_expert(path: Path, layout: ExpertLayout, gen: torch.Generator) -> None:
    """An expert file written by the store's own writer (what reshard uses)."""
    dtype = getattr(torch, layout.dtype)
    tensors = []
    for name, shape in layout.shapes.items():
        data = torch.randn(shape, generator=gen).to(dtype).contiguous().view(torch.uint8).numpy().tobytes()
        tensors.append(OutTensor(name, DTYPE_CODES[layout.dtype], shape, len(data), from_bytes(data)))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tensor_file(path, tensors)


def make_store(root: Path, dtype: str = "float32") -> tuple[ExpertLayout, callable]:
    layout = ExpertLayout(hidden=HIDDEN, expert_dim=EXPERT_DIM, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    for layer in range(LAYERS):
        for expert in range(EXPERTS):
            write_expert(root / f"L{layer:03d}" / f"E{expert:03d}.safetensors", layout, gen)
    return layout, lambda layer, expert: root / f"L{layer:03d}" / f"E{expert:03d}.safetensors"


def expected(path_of, layer, expert, dtype=torch.float32):
    tensors = load_file(str(path_of(layer, expert)))
    return [tensors[n].to(dtype) for n in ("gate_proj", "up_proj", "down_proj")]


def make_cache(path_of, layout, slots, policy="lru", dtype=torch.float32, **kw):
    return ExpertCache(
        path_of,
        layout,
        slots=slots,
        policy=make_policy(policy),
        device=torch.device("cpu"),
        dtype=dtype,
        **kw,
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("experts"))


def collect(cache, layer, ids, path_of, dtype=torch.float32):
    seen = []
    for expert, weights in cache.experts(layer, ids):
        for got, want in zip(weights, expected(path_of, layer, expert, dtype), strict=True):
            assert torch.equal(got, want), (layer, expert)
        seen.append(expert)
    return seen


def test_header_matches_safetensors_and_is_aligned(store):
    layout, path_of = store
    assert data_start(path_of(0, 0)) == DATA_OFFSET
    assert path_of(0, 0).stat().st_size == layout.file_bytes
    assert set(load_file(str(path_of(0, 0)))) == {"gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("slots", [2, 6, 12, LAYERS * EXPERTS])
def test_every_expert_exact_and_accounted(store, policy, slots):
    layout, path_of = store
    cache = make_cache(path_of, layout, slots, policy)
    rng = random.Random(slots)
    try:
        for _ in range(20):
            for layer in range(LAYERS):
                ids = rng.sample(range(EXPERTS), 2) + [rng.randrange(EXPERTS)]  # duplicates are served once
                seen = collect(cache, layer, ids, path_of)
                assert sorted(seen) == sorted(set(ids))
        total = cache.stats.total()
        assert total.hits + total.misses == total.requests
        assert total.bytes_read == total.misses * layout.data_bytes
        assert len(cache.resident()) <= slots
        if slots == LAYERS * EXPERTS:
            assert total.misses <= LAYERS * EXPERTS  # each expert read at most once
    finally:
        cache.close()


def test_lru_fetch_count_matches_a_hand_simulation(store):
    layout, path_of = store
    cache = make_cache(path_of, layout, 3, "lru")
    sequence = [(0, [0, 1]), (1, [2]), (0, [0, 1]), (1, [3]), (0, [2, 1]), (0, [0])]
    # slots: {0,1} -> +2 {0,1,2} -> hits -> evict LRU (1,2)... by hand: misses 2,1,0,1,1(0,2),1(0,0)
    for layer, ids in sequence:
        collect(cache, layer, ids, path_of)
    assert cache.stats.total().misses == 2 + 1 + 0 + 1 + 1 + 1
    cache.close()


def test_more_experts_in_one_layer_than_slots(store):
    """Prefill may route to every expert of a layer; the cache streams them through its few slots."""
    layout, path_of = store
    cache = make_cache(path_of, layout, 2)
    assert sorted(collect(cache, 1, list(range(EXPERTS)), path_of)) == list(range(EXPERTS))
    cache.close()


def test_half_precision_files_convert_to_compute_dtype(tmp_path):
    layout, path_of = make_store(tmp_path, "bfloat16")
    cache = make_cache(path_of, layout, 4)
    collect(cache, 2, [1, 5, 7], path_of)
    cache.close()
    same = make_cache(path_of, layout, 4, dtype=torch.bfloat16)  # raw slots: no conversion
    collect(same, 2, [1, 5, 7], path_of, dtype=torch.bfloat16)
    same.close()


def test_prefetch_hits_and_waste(store):
    layout, path_of = store
    cache = make_cache(path_of, layout, 4)
    assert cache.prefetch([ExpertKey(2, 3), ExpertKey(2, 4)]) == 2
    collect(cache, 2, [3], path_of)
    s = cache.stats.layer(2)
    assert (s.hits, s.misses, s.prefetch_issued, s.prefetch_used) == (1, 0, 2, 1)
    # Fill the pool so the unused prefetch of (2, 4) is evicted: it is counted as wasted.
    for layer in (0, 1):
        collect(cache, layer, [0, 1], path_of)
    collect(cache, 0, [2, 3], path_of)
    assert cache.stats.layer(2).prefetch_wasted == 1
    cache.close()


def test_prefetch_stress_never_serves_torn_or_stale_data(store):
    layout, path_of = store
    cache = make_cache(path_of, layout, 5, workers=4)
    rng = random.Random(7)
    stop = threading.Event()

    def churn():
        r = random.Random(1)
        while not stop.is_set():
            keys = [ExpertKey(r.randrange(LAYERS), r.randrange(EXPERTS)) for _ in range(4)]
            cache.prefetch(keys)
            if r.random() < 0.5:
                cache.cancel_prefetches()

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(150):
            layer = rng.randrange(LAYERS)
            collect(cache, layer, rng.sample(range(EXPERTS), 2), path_of)
    finally:
        stop.set()
        thread.join()
        cache.close()
    total = cache.stats.total()
    assert total.hits + total.misses == total.requests
    assert total.prefetch_issued > 0


def test_truncated_file_names_the_file(tmp_path):
    layout, path_of = make_store(tmp_path)
    bad = path_of(1, 2)
    bad.write_bytes(bad.read_bytes()[:-100])
    cache = make_cache(path_of, layout, 4)
    with pytest.raises(CorruptExpertFile, match="E002.safetensors"):
        collect(cache, 1, [0, 2], path_of)
    collect(cache, 1, [0, 1], path_of)  # the cache still works for good files
    cache.close()


def test_corrupt_header_names_the_file(tmp_path):
    layout, path_of = make_store(tmp_path)
    bad = path_of(0, 5)
    raw = bytearray(bad.read_bytes())
    raw[12] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with pytest.raises(CorruptExpertFile, match="E005"):
        ExpertReader(layout).read_into(bad, memoryview(bytearray(layout.read_bytes)))


def test_vanished_store_raises_instead_of_hanging(tmp_path):
    import shutil

    layout, path_of = make_store(tmp_path)
    cache = make_cache(path_of, layout, 4)
    collect(cache, 0, [0], path_of)
    shutil.rmtree(tmp_path / "L001")
    with pytest.raises(CorruptExpertFile, match="missing"):
        collect(cache, 1, [0], path_of)
    cache.close()


def test_reader_mode_is_reported(store):
    layout, path_of = store
    reader = ExpertReader(layout)
    import mmap

    buf = mmap.mmap(-1, layout.read_bytes)
    reader.read_into(path_of(0, 0), memoryview(buf))
    assert reader.mode in ("direct", "buffered")
    assert ExpertReader(layout, direct=False).mode == "buffered"


def test_bulk_prefill_does_not_flush_the_working_set(store):
    layout, path_of = store
    cache = make_cache(path_of, layout, 4, bulk_threshold=2)
    collect(cache, 0, [0, 1], path_of)  # decode-sized requests fill the pool normally
    collect(cache, 0, [2, 3], path_of)
    working_set = cache.resident()
    assert len(working_set) == 4
    assert sorted(collect(cache, 1, list(range(EXPERTS)), path_of)) == list(range(EXPERTS))
    assert cache.resident() == working_set
    assert cache.stats.layer(1).bypassed == EXPERTS
    # With free slots a bulk request uses them first: a fresh cache keeps what prefill read.
    fresh = make_cache(path_of, layout, 4, bulk_threshold=2)
    collect(fresh, 2, list(range(EXPERTS)), path_of)
    assert len(fresh.resident()) == 4 and fresh.stats.layer(2).bypassed == EXPERTS - 4
    cache.close()
    fresh.close()


def test_naive_reads_every_routed_expert_and_keeps_none(store):
    layout, path_of = store
    cache = ExpertCache(
        path_of,
        layout,
        slots=0,
        policy=make_policy("naive"),
        device=torch.device("cpu"),
        dtype=torch.float32,
        scratch_slots=2,
    )
    for layer in range(LAYERS):
        collect(cache, layer, [0, 1, 2], path_of)
        collect(cache, layer, [0, 1], path_of)
    total = cache.stats.total()
    assert total.misses == total.requests == LAYERS * 5
    assert total.bytes_read == total.requests * layout.data_bytes
    assert cache.resident() == set()
    cache.close()


def test_request_hooks_reach_the_policy(store):
    layout, path_of = store
    calls = []

    class Spy(type(make_policy("lru"))):
        def on_request_start(self):
            calls.append("start")

        def on_request_end(self):
            calls.append("end")

    cache = ExpertCache(
        path_of, layout, slots=4, policy=Spy(), device=torch.device("cpu"), dtype=torch.float32
    )
    cache.start_request()
    collect(cache, 0, [1], path_of)
    cache.end_request()
    assert calls == ["start", "end"]
    cache.close()


def test_hold_keeps_a_layers_experts_pinned_until_the_iterator_closes(store):
    """The fused decode path takes a layer's experts all at once: with hold=True nothing handed over
    may be evicted (or its slot refilled) before the iterator is closed."""
    layout, path_of = store
    cache = make_cache(path_of, layout, slots=3, bulk_threshold=3, scratch_slots=0)
    try:
        collect(cache, 0, [0, 1, 2], path_of)
        assert cache.all_ready(0, [2, 0, 1]) and not cache.all_ready(0, [0, 3])
        before = cache.stats.total().requests
        held = cache.experts(0, [0, 1, 2], hold=True)
        got = dict(islice(held, 3))  # not exhausted: a finished generator has released everything
        assert cache.stats.total().requests == before + 3  # accounted as any request
        assert cache.prefetch([ExpertKey(1, 0)]) == 0  # every slot pinned: nothing to evict
        for expert, weights in got.items():
            for have, want in zip(weights, expected(path_of, 0, expert), strict=True):
                assert torch.equal(have, want)
        held.close()
        assert cache.prefetch([ExpertKey(1, 0)]) == 1  # released together
    finally:
        cache.close()
