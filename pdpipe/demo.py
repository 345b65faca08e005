"""The embedded default model: a small generated Llama, made on first use and cached."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from pdpipe import envs
from pdpipe.models.make_config import CORPUS, MakeModelConfig

DEMO_CONFIG = MakeModelConfig(arch="llama", layers=4, hidden=128, heads=4, kv_heads=2, vocab=512,
                              max_position=4096, seed=0)
_FORMAT = 2  # bump when make-model's output changes for the same config


def demo_model_dir() -> Path:
    key = json.dumps([asdict(DEMO_CONFIG), _FORMAT], sort_keys=True).encode() + CORPUS.read_bytes()
    path = envs.cache_dir() / f"demo-llama-{hashlib.sha256(key).hexdigest()[:12]}"
    if not (path / "config.json").is_file():
        from pdpipe.models.make import make_model  # torch: only where the model is made

        make_model(path, DEMO_CONFIG, overwrite=False)
    return path


def resolve_model(model: str | Path | None) -> Path:
    """`model` as a folder, or the demo model when it is empty."""
    return Path(model) if model else demo_model_dir()
