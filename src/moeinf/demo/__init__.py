"""The built-in demo model: a small Mixtral-style MoE trained by scripts/demo_model/, shipped as package data.

Owns only the location of the packaged checkpoint (hub format: config.json, model.safetensors, tokenizer
files); pulling it into the store is `moeinf pull demo`'s job. Provenance and licences: README.md here.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def checkpoint_dir() -> Path:
    """Directory holding the demo checkpoint in Hugging Face hub format (a local `pull` source)."""
    return Path(__file__).resolve().parent
