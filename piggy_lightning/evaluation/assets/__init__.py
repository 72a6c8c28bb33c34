"""Data shipped with the evaluation package.

* ``betley/``: Betley et al. (2025)'s MIT-licensed evaluation YAMLs (question sets and the ``aligned``/``coherent``
  judge prompts, word for word) with their ``LICENSE`` and a ``PROVENANCE.md``. Question sets name them as
  ``piggy/betley/<file>``.
"""

from __future__ import annotations

from pathlib import Path

BETLEY_DIR = Path(__file__).parent / "betley"
BETLEY_PREFIX = "piggy/betley/"


def resolve_asset(source: str) -> str:
    """Map ``piggy/betley/<file>`` to the shipped file; return other sources unchanged."""
    if source.startswith(BETLEY_PREFIX):
        return str(BETLEY_DIR / source[len(BETLEY_PREFIX) :])
    return source
