"""Request fields -> moeinf parameters: typed JSON fields, ollama `options`, OpenAI sampling fields,
and `keep_alive` durations.

A wrong JSON type is `BadRequest`, a value moeinf cannot use is `BadOption` (both answered 400).
Sampling overrides are validated here, at once, but applied in the worker on top of the loaded model's
own defaults, exactly as `moeinf run` applies its flags. Pure Python: no HTTP, no torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from moeinf.cli.session import PARAMETERS  # ollama parameter name -> (field, type), as `/set parameter`
from moeinf.errors import BadOption, BadRequest
from moeinf.runtime.generate import GenerationParams
from moeinf.runtime.sampling import SamplingParams

_MISSING = object()

# ollama options that only make sense for llama.cpp (threads, GPU layers, mmap, ...): accepted, ignored,
# so that clients sending ollama's full option set keep working.
IGNORED_OLLAMA_OPTIONS = frozenset(
    {
        "num_keep",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "num_thread",
        "numa",
        "low_vram",
        "vocab_only",
        "use_mmap",
        "use_mlock",
        "penalize_newline",
        "typical_p",
        "tfs_z",
        "mirostat",
        "mirostat_tau",
        "mirostat_eta",
        "presence_penalty",
        "frequency_penalty",
    }
)


def get(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """`body[name]` checked against `kind` (JSON null counts as absent); ints are accepted as floats."""
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and bool not in kinds:
        raise BadRequest(f"field {name!r} must be {_kind_names(kinds)}, got a boolean")
    if not isinstance(value, kinds):
        raise BadRequest(f"field {name!r} must be {_kind_names(kinds)}, got {_json_type(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise BadOption(f"field {name!r} must be a finite number")
    return value


def require(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = get(body, name, kind)
    if value is None:
        raise BadRequest(f"field {name!r} is required")
    return value


def _kind_names(kinds: tuple[type, ...]) -> str:
    return " or ".join(_json_type(k) for k in kinds)


def _json_type(value: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array"}
    names[dict] = "an object"
    kind = value if isinstance(value, type) else type(value)
    return names.get(kind, kind.__name__)


@dataclass(frozen=True)
class RequestParams:
    """What a request asks of generation, before the model (and its default sampling) is known."""

    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams field -> value
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    num_ctx: int | None = None  # context length to load the model with (ollama's options.num_ctx)

    def __post_init__(self) -> None:
        SamplingParams().replace(**self.sampling)  # an invalid value fails now, before queueing
        GenerationParams(max_tokens=self.max_tokens)
        if self.num_ctx is not None and self.num_ctx < 2:
            raise BadOption(f"num_ctx must be >= 2, got {self.num_ctx}")

    def generation(self, defaults: SamplingParams) -> GenerationParams:
        """The parameters for `generate`: the model's defaults with this request's overrides."""
        return GenerationParams(
            max_tokens=self.max_tokens,
            stop=self.stop,
            ignore_eos=self.ignore_eos,
            sampling=defaults.replace(**self.sampling),
        )


def _stop_list(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(s for s in value if s)
    raise BadRequest(f"field {name!r} must be a string or an array of strings")


def ollama_params(options: Any) -> RequestParams:
    """ollama's `options` object (temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed,
    num_predict, stop, num_ctx; plus `ignore_eos`, as vLLM's API has it)."""
    if options is None:
        return RequestParams()
    if not isinstance(options, dict):
        raise BadRequest(f"field 'options' must be an object, got {_json_type(options)}")
    sampling: dict[str, Any] = {}
    generation: dict[str, Any] = {}
    for name in options:
        if name in IGNORED_OLLAMA_OPTIONS or name in ("num_ctx", "ignore_eos"):
            continue
        if name not in PARAMETERS:
            known = sorted({*PARAMETERS, "num_ctx", "ignore_eos"})
            raise BadOption(f"unknown option {name!r} (known: {', '.join(known)})")
        target, kind = PARAMETERS[name]
        if target == "stop":
            generation["stop"] = _stop_list(options[name], "options.stop")
            continue
        value = get(options, name, kind)
        if value is None:
            continue
        if target == "max_tokens":  # ollama: num_predict <= 0 (-1, -2) means no limit
            generation["max_tokens"] = value if value > 0 else None
        else:
            sampling[target] = value
    return RequestParams(
        sampling=sampling,
        num_ctx=get(options, "num_ctx", int),
        ignore_eos=bool(get(options, "ignore_eos", bool, False)),
        **generation,
    )


def openai_params(body: Mapping[str, Any]) -> RequestParams:
    """OpenAI's sampling fields: temperature, top_p, max_tokens / max_completion_tokens, stop, seed (plus
    top_k, min_p, repeat_penalty and ignore_eos as extras, as vLLM accepts them)."""
    if get(body, "n", int, 1) != 1:
        raise BadOption("n must be 1: moeinf generates one choice per request")
    for name in ("presence_penalty", "frequency_penalty"):
        if get(body, name, float, 0.0) != 0.0:
            raise BadOption(f"{name} is not supported (use repeat_penalty)")
    if get(body, "logprobs", (bool, int)):
        raise BadOption("logprobs are not supported")
    if get(body, "logit_bias", dict):
        raise BadOption("logit_bias is not supported")
    if get(body, "tools", list):
        raise BadOption("tools are not supported")
    response_format = get(body, "response_format", dict)
    if response_format and response_format.get("type", "text") != "text":
        raise BadOption("response_format: only {'type': 'text'} is supported")
    temperature = get(body, "temperature", float)
    if temperature is not None and temperature > 2.0:
        raise BadOption(f"temperature must be in [0, 2], got {temperature}")
    sampling = {
        name: value
        for name, value in (
            ("temperature", temperature),
            ("top_p", get(body, "top_p", float)),
            ("seed", get(body, "seed", int)),
            ("top_k", get(body, "top_k", int)),
            ("min_p", get(body, "min_p", float)),
            ("repeat_penalty", get(body, "repeat_penalty", float)),
        )
        if value is not None
    }
    max_tokens = get(body, "max_completion_tokens", int, get(body, "max_tokens", int))
    return RequestParams(
        sampling=sampling,
        max_tokens=max_tokens,
        stop=_stop_list(body.get("stop"), "stop"),
        ignore_eos=bool(get(body, "ignore_eos", bool, False)),
    )


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any, name: str = "keep_alive") -> float:
    """ollama's keep_alive in seconds: a number, or a Go duration ("5m", "1h30m", "500ms", "-1").
    Negative means forever (math.inf); 0 means unload right after the request."""
    if isinstance(value, bool):
        raise BadRequest(f"field {name!r} must be a number of seconds or a duration like '5m'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)
        except ValueError:
            parts = _DURATION_PART.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise BadOption(f"bad {name} {value!r}: use seconds or a duration like 30s, 5m, 1h") from None
            seconds = sign * sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    else:
        raise BadRequest(f"field {name!r} must be a number of seconds or a duration like '5m'")
    if math.isnan(seconds):
        raise BadOption(f"bad {name} {value!r}")
    return math.inf if seconds < 0 else seconds
