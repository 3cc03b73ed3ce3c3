"""The README's first command, `bash script/quickstart.sh`, end to end from a fresh clone of this repository, with a
small pretraining budget: data pipeline, the four pretraining phases, the SFT stages, DPO, eval and one chat answer.

The clone is of the committed HEAD (what CI checks out); it reuses this checkout's .venv, so setup.sh only checks
the environment instead of installing it again.
"""
import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_quickstart_runs_end_to_end_from_a_fresh_clone(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(clone)], check=True)
    (clone / ".venv").symlink_to((ROOT / ".venv").resolve())
    env = {**os.environ, "QS_TOKENS": "60000", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(["bash", "script/quickstart.sh"], cwd=clone, env=env, capture_output=True, text=True,
                       timeout=1200)
    log = r.stdout[-4000:] + "\n--- stderr ---\n" + r.stderr[-4000:]
    assert r.returncode == 0, log
    assert "Where everything is" in r.stdout, log
    summary = json.loads((clone / "data/summary.json").read_text())
    assert summary["read"]["totals"]["kept"] > 0
    assert summary["read"]["totals"]["read"] == summary["read"]["totals"]["kept"] + summary["read"]["totals"]["rejected"]
    for ckpt in ("out/pretrain/converge/final", "out/sft/reasoning/final", "out/dpo/general/final"):
        assert (clone / ckpt / "meta.json").is_file(), ckpt
    assert (clone / "out/eval/quickstart/compare.md").is_file()
    # step 6 answered the medical question through the chat template: some text after the prompt
    answer = r.stdout.split("6/6", 1)[1].splitlines()[1:]
    assert any(line.strip() for line in answer), log
    assert not list(Path(clone).glob("**/*.tmp-*")), "temporary files left behind"
