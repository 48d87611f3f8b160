"""Tokenizer: text <-> token ids with the `tokenizers` library, and chat templates rendered with jinja2.

Owns what transformers' `AutoTokenizer` does for a checkpoint directory, without transformers:
`encode(text)` equals `tokenizer(text)["input_ids"]` (default special tokens: BOS/EOS as the
post-processor in tokenizer.json adds them), and `render_chat()`
equals `apply_chat_template(..., tokenize=False)`: the same jinja environment (sandboxed, trim_blocks,
lstrip_blocks, loopcontrols, `raise_exception`, `strftime_now`, a non-escaping `tojson`) and the same
template variables (messages, add_generation_prompt, tools, documents, bos_token, eos_token, ...).
Reference: transformers `utils/chat_template_utils.py` and `tokenization_utils_tokenizers.py`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _BackendTokenizer

from moeinf.errors import ChatTemplateError, TokenizerError

# The named special tokens transformers passes to every chat template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

Message = Mapping[str, Any]


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens either as a string or as a serialised AddedToken.
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"cannot read {path.name}: {exc}") from exc
    return data if isinstance(data, dict) else {}


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers tracks assistant spans): renders the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters; transformers replaces it with plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    # `dict(...)` and `dict.fromkeys(...)` without exposing the type itself to the sandbox.
    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


@lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the environment transformers uses."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the model's chat template does not parse: {exc}") from exc


def _select_template(value: Any) -> str | None:
    # tokenizer_config.json holds either one template or a list of {"name", "template"}; "default" is used.
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        template = named.get("default")
        return template if isinstance(template, str) else None
    return None


class Tokenizer:
    """A checkpoint's tokenizer: encode, decode, special tokens and chat template."""

    def __init__(
        self,
        backend: _BackendTokenizer,
        *,
        special_tokens: Mapping[str, str] | None = None,
        chat_template: str | None = None,
    ) -> None:
        self._backend = backend
        # Our prompts are never silently cut: the context limit is checked by the caller.
        self._backend.no_truncation()
        self._backend.no_padding()
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        self.chat_template = chat_template
        self._special_ids = frozenset(
            i for i, token in self._backend.get_added_tokens_decoder().items() if token.special
        )

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.jinja."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(f"no tokenizer.json in {path}")
        try:
            backend = _BackendTokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the Rust library raises a bare Exception on a malformed file
            raise TokenizerError(f"cannot load {tokenizer_file}: {exc}") from exc
        config = _read_json(path / "tokenizer_config.json")

        special: dict[str, str] = {}
        for name in SPECIAL_TOKEN_NAMES:
            content = _token_content(config.get(name))
            if content is not None:
                special[name] = content
        # Like transformers, the legacy special_tokens_map.json counts only without added_tokens_decoder.
        if "added_tokens_decoder" not in config:
            for name, value in _read_json(path / "special_tokens_map.json").items():
                content = _token_content(value)
                if name in SPECIAL_TOKEN_NAMES and content is not None:
                    special[name] = content

        # chat_template.jinja takes precedence over the template inside tokenizer_config.json.
        template_file = path / "chat_template.jinja"
        if template_file.is_file():
            template = template_file.read_text(encoding="utf-8")
        else:
            template = _select_template(config.get("chat_template"))

        # add_bos_token/add_eos_token in tokenizer_config.json are ignored when tokenizer.json exists
        # (transformers 5 does the same): the post-processor in tokenizer.json is the truth.
        return cls(backend, special_tokens=special, chat_template=template)

    # -- ids ----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids including added tokens."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    @property
    def bos_token_id(self) -> int | None:
        bos = self.special_tokens.get("bos_token")
        return None if bos is None else self._backend.token_to_id(bos)

    @property
    def eos_token_id(self) -> int | None:
        eos = self.special_tokens.get("eos_token")
        return None if eos is None else self._backend.token_to_id(eos)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of added tokens marked special (skipped when decoding for display)."""
        return self._special_ids

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with special tokens it equals transformers' `tokenizer(text)`."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat ---------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def render_chat(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **variables: Any,
    ) -> str:
        """The conversation as text, as `apply_chat_template(messages, tokenize=False, ...)` renders it."""
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template (use raw mode)")
        if not messages:
            raise ChatTemplateError("cannot apply the chat template to an empty conversation")
        # Like transformers: keys whose value is None are dropped; caller variables override special tokens.
        chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        context = {**self.special_tokens, **variables}
        try:
            return compile_chat_template(self.chat_template).render(
                messages=chat,
                tools=list(tools) if tools is not None else None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **context,
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template: {exc}") from exc

    def encode_chat(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered conversation (the template writes its own special tokens)."""
        return self.encode(
            self.render_chat(messages, add_generation_prompt=add_generation_prompt), add_special_tokens=False
        )
