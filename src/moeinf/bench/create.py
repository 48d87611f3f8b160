"""`moeinf create`: a random-weight MoE of a chosen shape, written and pulled into the store.

Writes the synthetic checkpoint (bench/synthetic.py) into a temporary folder under the store root
(same disk, so the pull reads locally), pulls it like any local checkpoint, and deletes the folder.
Free disk is checked before anything is written: the checkpoint plus its resharded copy.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from moeinf.bench.synthetic import SyntheticShape, write_synthetic_checkpoint
from moeinf.errors import ModelExists, TokenizerError
from moeinf.names import validate_name
from moeinf.pull import PullEvent, normalise_dtype, pull
from moeinf.store import Store, StoredModel

_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


def checkpoint_bytes(shape: SyntheticShape, vocab: int, dtype: str) -> int:
    """Weight bytes of the synthetic checkpoint (experts + attention + embeddings + norms)."""
    d, heads, kv = shape.hidden, shape.heads, shape.kv_heads
    head_dim = d // heads
    attn = d * heads * head_dim * 2 + d * kv * head_dim * 2
    per_layer = shape.experts * shape.expert_params + attn + shape.experts * d + 2 * d
    return (shape.layers * per_layer + 2 * vocab * d + d) * _ITEMSIZE[dtype]


def default_tokenizer_dir() -> Path:
    from moeinf.demo import checkpoint_dir

    return checkpoint_dir()


def create(
    name: str,
    shape: SyntheticShape,
    *,
    dtype: str = "bf16",
    seed: int = 0,
    store: Store | None = None,
    tokenizer_dir: Path | None = None,
    progress: Callable[[PullEvent], None] | None = None,
) -> StoredModel:
    """Create model `name` of `shape` in the store; `progress` receives pull-style events."""
    import json

    name = validate_name(name)
    store = store or Store()
    emit = progress or (lambda event: None)
    dtype_name = normalise_dtype(dtype) or "bfloat16"
    tokenizer_dir = tokenizer_dir or default_tokenizer_dir()
    tokenizer_file = tokenizer_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise TokenizerError(
            f"no tokenizer.json in {tokenizer_dir}: the synthetic model borrows its tokenizer"
        )
    if store.exists(name):
        raise ModelExists(f"a model named {name!r} exists: `moeinf rm {name}` it or choose another name")
    vocab = len(json.loads(tokenizer_file.read_text())["model"]["vocab"])
    size = checkpoint_bytes(shape, vocab, dtype_name)
    store.check_free(2 * size, f"creating {name}")  # the checkpoint, then its resharded copy

    store.home.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".create-{name}-", dir=store.home))
    try:
        label = f"random weights {shape.layers}x{shape.experts}x{shape.top_k}"

        def layer_progress(done: int, total: int) -> None:  # layers -> bytes, for pull's byte bars
            emit(PullEvent("file", file=label, phase="write", done=size * done // total, total=size))

        write_synthetic_checkpoint(
            tmp / "ckpt",
            shape,
            tokenizer_dir=tokenizer_dir,
            dtype=dtype_name,
            seed=seed,
            progress=layer_progress,
        )
        return pull(str(tmp / "ckpt"), name=name, store=store, progress=emit)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
