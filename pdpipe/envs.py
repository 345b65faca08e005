"""The few environment variables pdpipe reads, in one typed registry. They are for debugging, placing
caches and the benchmark client's credential; behaviour is configured through config files and flags,
never through these (the server's own key is `api.api_key`, in the config)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """PDPIPE_CACHE_DIR: where generated models (the embedded demo) are cached."""
    return Path(os.environ.get("PDPIPE_CACHE_DIR") or Path.home() / ".cache" / "pdpipe")


def log_level() -> str:
    """PDPIPE_LOG_LEVEL: logging level of every pdpipe process (default INFO)."""
    return os.environ.get("PDPIPE_LOG_LEVEL", "INFO").upper()


def openai_api_key() -> str:
    """OPENAI_API_KEY: the key `pdpipe bench` sends when --api-key is not given (OpenAI clients' convention)."""
    return os.environ.get("OPENAI_API_KEY", "")
