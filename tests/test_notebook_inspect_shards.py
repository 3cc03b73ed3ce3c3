"""notebooks/inspect_shards.ipynb runs top to bottom (real kernel via nbclient) on shards made here, so it
cannot rot: its tables, figures, decoded samples and final consistency assertion all execute."""
import json

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT, SAMPLES
from data_process import tokenize_docs
from data_process.recipe import parse_recipe
from data_process.records import write_parts

MODEL = SAMPLES / "chatglm2-tokenizer" / "tokenizer.model"
NOTEBOOK = ROOT / "notebooks" / "inspect_shards.ipynb"


def make_pretrain(root):
    with open(SAMPLES / "skywork-zh-web" / "zh_general.jsonl", encoding="utf-8") as f:
        web = [json.loads(line)["text"] for line in f][:60]
    fever = [line for line in (SAMPLES / "medicalgpt" / "pretrain" / "fever.txt").read_text("utf-8").splitlines()
             if line.strip()][:200]
    write_parts([{"id": f"w:{i}", "corpus": "web", "kind": "doc", "text": t} for i, t in enumerate(web)],
                root / "docs" / "web")
    write_parts([{"id": f"f:{i}", "corpus": "med", "kind": "doc", "text": t} for i, t in enumerate(fever)],
                root / "docs" / "med")
    recipe = parse_recipe({"tokenize": {"val_fraction": 0.1, "shard_tokens": 20_000, "sft_as_pretrain": []},
                           "corpus": [{"name": "web", "reader": "jsonl", "paths": ["x"]},
                                      {"name": "med", "reader": "text", "paths": ["x"]}]}, root)
    tokenize_docs.run(recipe, root / "docs", MODEL, root / "pretrain", progress=False)
    return root / "pretrain"


def run_notebook(monkeypatch, data_dir):
    monkeypatch.setenv("INSPECT_SHARDS_DIR", str(data_dir))
    monkeypatch.setenv("INSPECT_SHARDS_TOKENIZER", str(MODEL))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    return nb


@pytest.mark.slow
def test_notebook_executes_on_fresh_shards_and_flags_a_broken_one(tmp_path, monkeypatch):
    import shutil
    pretrain = make_pretrain(tmp_path)
    shutil.copytree(pretrain / "med", pretrain / "broken")   # a third corpus, with a truncated .bin
    bin_file = pretrain / "broken" / "train-00000.bin"
    bin_file.write_bytes(bin_file.read_bytes()[:-4])
    nb = run_notebook(monkeypatch, pretrain)
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    errors = [(i, o) for i, cell in enumerate(code_cells) for o in cell.outputs if o.output_type == "error"]
    # only the final consistency cell fails, and it names the broken corpus
    assert [i for i, _ in errors] == [len(code_cells) - 1]
    assert errors[0][1].ename == "AssertionError" and "broken" in errors[0][1].evalue
    assert "med" not in errors[0][1].evalue.replace("broken", "")
    outputs = [o for cell in code_cells for o in cell.outputs]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2   # token mix + length histograms
    text = "".join(o.get("text", "") for o in outputs) + "".join(
        o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "3 corpora under" in text and "web: OK" in text and "med: OK" in text and "broken: FAILED" in text
    assert "--- web/train-" in text or "--- web/val-" in text
