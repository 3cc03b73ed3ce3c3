"""Shared test helpers: where the real corpus samples live, and the repo root on sys.path.

The real-sample tests find the samples in one place: `SAMPLES` (the `samples` fixture), by default
`../shared/corpora-samples` beside the repo, or wherever `CORPORA_SAMPLES` points. Without them, the tests that
need them fail with a message saying where to get them; every other test still runs. Collecting a test module
never reads a sample file.
"""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = Path(os.environ.get("CORPORA_SAMPLES", ROOT.parent / "shared" / "corpora-samples"))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


MISSING_SAMPLES = (
    f"real corpus samples not found at {SAMPLES}: these tests read byte-exact samples of the public corpora "
    "(the folder `shared/corpora-samples` beside this repo; its README lists each file's upstream repository and "
    "commit). Put them there or set CORPORA_SAMPLES=/path/to/corpora-samples.")


def _uses_samples(module) -> bool:
    return getattr(module, "SAMPLES", None) is SAMPLES


def needs_samples(item) -> bool:
    """A test needs the samples if it asks for the `samples` fixture, its module imports `SAMPLES`, or it uses
    helpers from a test module that does."""
    if "samples" in getattr(item, "fixturenames", ()) or _uses_samples(item.module):
        return True
    helpers = {getattr(v, "__module__", None) for v in vars(item.module).values()}
    return any(_uses_samples(sys.modules[m]) for m in helpers if m and m.startswith("test_") and m in sys.modules)


def pytest_runtest_setup(item):
    if not SAMPLES.is_dir() and needs_samples(item):
        pytest.fail(MISSING_SAMPLES, pytrace=False)


@pytest.fixture(scope="session")
def samples() -> Path:
    if not SAMPLES.is_dir():
        pytest.fail(MISSING_SAMPLES, pytrace=False)
    return SAMPLES


def edit(text: str, rate: float, rng) -> str:
    """Substitute a `rate` fraction of characters by other characters of the same text (a near-duplicate)."""
    chars = list(text)
    for i in rng.sample(range(len(chars)), int(len(chars) * rate)):
        chars[i] = rng.choice(text)
    return "".join(chars)
