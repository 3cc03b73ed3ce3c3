"""Shared test helpers: where the real corpus samples live, and the repo root on sys.path."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = Path(os.environ.get("CORPORA_SAMPLES", ROOT.parent / "shared" / "corpora-samples"))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def samples() -> Path:
    assert SAMPLES.is_dir(), f"real corpus samples not found at {SAMPLES} (set CORPORA_SAMPLES)"
    return SAMPLES


def edit(text: str, rate: float, rng) -> str:
    """Substitute a `rate` fraction of characters by other characters of the same text (a near-duplicate)."""
    chars = list(text)
    for i in rng.sample(range(len(chars)), int(len(chars) * rate)):
        chars[i] = rng.choice(text)
    return "".join(chars)
