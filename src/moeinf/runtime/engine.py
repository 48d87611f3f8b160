"""Engine: one loaded model, ready to generate: decoder + expert provider + tokenizer + defaults.

`Engine.load(model_ref)` opens the model in the store (pulling it first when it is not there, as
`ollama run` does), picks device, dtype and CPU threads, builds the expert provider (all-resident by
default; the budgeted expert cache comes in through `provider=`), loads the decoder and the tokenizer,
and reads the model's generation defaults. It also holds the conversation state `generate` needs:
the token ids currently in the decoder's KV cache (`kv_tokens`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from moeinf.errors import BadOption, ModelNotFound, UnknownAlias
from moeinf.runtime.expert_provider import ExpertProvider, LookaheadProvider, RequestAware
from moeinf.runtime.generate import StepDecoder
from moeinf.runtime.sampling import SamplingParams
from moeinf.runtime.tokenizer import Tokenizer

if TYPE_CHECKING:
    from moeinf.models.spec import ModelSpec
    from moeinf.store import Store, StoredModel

DEFAULT_CONTEXT = 4096  # KV cache positions preallocated unless asked otherwise (capped by the model)

# (stored model, device, dtype) -> the provider of routed experts; ResidentProvider has this signature.
ProviderFactory = Callable[["StoredModel", torch.device, torch.dtype], ExpertProvider]
Progress = Callable[..., None]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@runtime_checkable
class StatsSource(Protocol):
    """A provider that keeps statistics (the expert cache: `stats.to_dict()`)."""

    stats: Any


@runtime_checkable
class Closable(Protocol):
    def close(self) -> None: ...


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """ "auto": CUDA when present, else CPU."""
    if isinstance(device, torch.device):
        return device
    name = device.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BadOption("--device cuda: no CUDA device is available (use --device cpu)")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise BadOption(f"unknown device {device!r} (use auto, cpu or cuda)")


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Compute dtype: fp32 on CPU (exact, and fast on CPUs without bf16 units), bf16 (else fp16) on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise BadOption(f"unknown dtype {dtype!r} (use {', '.join(sorted(_DTYPES))})") from None


def default_threads() -> int:
    """One thread per physical core this process may run on: decode is memory-bound, and a second
    hyper-thread per core only adds contention (llama.cpp's default too)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:  # no topology (some containers): count logical CPUs
            return max(1, len(cpus))
    return max(1, len(cores))


def eos_token_ids(
    generation_config: Mapping[str, Any], config: Mapping[str, Any], tokenizer: Tokenizer
) -> frozenset[int]:
    """EOS ids as transformers' generate takes them: generation_config.json, else config.json, else the
    tokenizer's eos token. Each may be one id or a list."""
    for source in (generation_config, config):
        value = source.get("eos_token_id")
        if value is not None:
            return frozenset([value] if isinstance(value, int) else (int(v) for v in value))
    eos = tokenizer.eos_token_id
    return frozenset() if eos is None else frozenset([eos])


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


class Engine:
    """A loaded model. Build with `Engine.load`; the constructor takes ready parts (used by tests)."""

    def __init__(
        self,
        *,
        decoder: StepDecoder,
        tokenizer: Tokenizer,
        device: torch.device,
        dtype: torch.dtype,
        context_length: int,
        eos_token_ids: frozenset[int],
        spec: ModelSpec | None = None,
        stored: StoredModel | None = None,
        provider: ExpertProvider | None = None,
        generation_config: Mapping[str, Any] | None = None,
        threads: int | None = None,
        load_s: float = 0.0,
    ) -> None:
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.context_length = context_length
        self.eos_token_ids = eos_token_ids
        self.spec = spec
        self.stored = stored
        self.provider = provider
        self.generation_config = dict(generation_config or {})
        self.threads = threads
        self.load_s = load_s
        self.kv_tokens: list[int] = []  # token ids whose keys/values the decoder's cache holds
        self.request_listeners: list[RequestAware] = []  # told of request boundaries after the provider

    @classmethod
    def load(
        cls,
        model_ref: str,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype | None = None,
        threads: int | None = None,
        store: Store | None = None,
        context_length: int | None = None,
        provider: ProviderFactory | None = None,
        progress: Progress | None = None,
    ) -> Engine:
        """Open (pulling first if needed) and load a model. `progress` is passed to `pull`."""
        from moeinf.models.transformer import load_decoder
        from moeinf.names import resolve_name
        from moeinf.runtime import kv_cache
        from moeinf.runtime.cache_plan import dense_bytes_for
        from moeinf.store import Store

        start = time.perf_counter()
        store = store if store is not None else Store()
        stored = _open_or_pull(store, model_ref, resolve_name(model_ref), progress)
        spec = stored.manifest.spec

        torch_device = pick_device(device)
        torch_dtype = pick_dtype(dtype, torch_device)
        if threads is not None and threads < 1:
            raise BadOption(f"threads must be >= 1, got {threads}")
        n_threads = threads or default_threads()
        torch.set_num_threads(n_threads)

        limit = spec.max_position_embeddings
        if context_length is not None and context_length < 2:
            raise BadOption(f"context length must be >= 2, got {context_length}")
        context = min(limit, context_length or DEFAULT_CONTEXT)

        if provider is None:
            from moeinf.runtime.resident import ResidentProvider

            provider = ResidentProvider
        # The KV cache first (checked against the memory left beside the dense weights, then zeroed):
        # the expert budget planned next then sees the memory it really has.
        dense = dense_bytes_for(stored, torch_dtype)
        caches = kv_cache.allocate_within(spec, context, torch_device, torch_dtype, beside=dense)
        experts = provider(stored, torch_device, torch_dtype)
        decoder = load_decoder(
            stored, experts, device=torch_device, dtype=torch_dtype, max_seq_len=context, caches=caches
        )
        if isinstance(experts, LookaheadProvider) and experts.wants_lookahead:
            decoder.enable_lookahead(experts)
        tokenizer = Tokenizer.from_dir(stored.tokenizer_dir)
        generation_config = _read_json(Path(stored.tokenizer_dir) / "generation_config.json")
        config = _read_json(Path(stored.tokenizer_dir) / "config.json")
        return cls(
            decoder=decoder,
            tokenizer=tokenizer,
            device=torch_device,
            dtype=torch_dtype,
            context_length=context,
            eos_token_ids=eos_token_ids(generation_config, config, tokenizer),
            spec=spec,
            stored=stored,
            provider=experts,
            generation_config=generation_config,
            threads=n_threads,
            load_s=time.perf_counter() - start,
        )

    @property
    def name(self) -> str:
        return self.stored.name if self.stored is not None else "model"

    def default_sampling(self) -> SamplingParams:
        """The model's own sampling defaults (generation_config.json; greedy when it has none)."""
        return SamplingParams.from_generation_config(self.generation_config)

    def start_request(self) -> None:
        """A generation starts: the expert cache's policy may learn per request (trace library), and
        `request_listeners` (e.g. a routing-trace file recorder) hear of it too."""
        if isinstance(self.provider, RequestAware):
            self.provider.start_request()
        for listener in self.request_listeners:
            listener.start_request()

    def prompt_done(self, tokens: int) -> None:
        """Generation has run the request's prompt (`tokens` of it; a reused prefix is not run again):
        listeners that split prompt from answer (`prompt_done`) hear of it."""
        for listener in self.request_listeners:
            note = getattr(listener, "prompt_done", None)
            if note is not None:
                note(tokens)

    def end_request(self) -> None:
        if isinstance(self.provider, RequestAware):
            self.provider.end_request()
        for listener in self.request_listeners:
            listener.end_request()

    def cache_stats(self) -> dict:
        """The expert cache's statistics when the provider keeps any, else {}."""
        if isinstance(self.provider, StatsSource):
            return self.provider.stats.to_dict()
        return {}

    def reset(self) -> None:
        """Forget the KV cache (a new conversation)."""
        self.kv_tokens.clear()
        self.decoder.reset()

    def close(self) -> None:
        """Release the provider's resources (the expert cache's worker threads)."""
        if isinstance(self.provider, Closable):
            self.provider.close()


def _open_or_pull(store: Store, model_ref: str, name: str, progress: Progress | None) -> StoredModel:
    from moeinf.pull import pull

    try:
        return store.open(name)
    except ModelNotFound as missing:
        try:
            return pull(model_ref, store=store, progress=progress)
        except UnknownAlias:
            raise missing from None
