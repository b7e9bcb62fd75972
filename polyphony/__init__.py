"""polyphony: multi-track symbolic music generation with a GPT over miditok tokens.

``polyphony.generate(instruments="piano, bass, drums", bars=32)`` returns a ``symusic.Score``
(see :func:`polyphony.generation.generate`). It is imported on first use, so ``import
polyphony`` stays cheap (no torch, no miditok).
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["generate"]


def __getattr__(name: str):
    if name == "generate":
        from .generation import generate

        return generate
    raise AttributeError(f"module 'polyphony' has no attribute {name!r}")
