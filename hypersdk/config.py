"""Where hypersdk keeps its own data on this machine (overridable with HYPERSDK_HOME)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """``$HYPERSDK_HOME``, else ``$XDG_DATA_HOME/hypersdk``, else ``~/.local/share/hypersdk``."""
    if env := os.environ.get("HYPERSDK_HOME"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(xdg) / "hypersdk"


def default_source_url() -> str:
    return f"local://{home() / 'vms'}"


def default_target_url() -> str:
    return f"file://{home() / 'exports'}"
