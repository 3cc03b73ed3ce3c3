"""DESIGN: data flows one way and nothing downstream imports an entry script. Shared code lives in library
modules (train_loop, finetune, lora, inference, tokenizer, model, data_process/*)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY_SCRIPTS = {"pretrain", "sft", "dpo", "grpo", "eval", "chat", "serve", "export"}


def imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_no_project_module_imports_an_entry_script():
    modules = sorted(ROOT.glob("*.py")) + sorted((ROOT / "data_process").glob("*.py"))
    assert len(modules) > 15
    offenders = {p.name: sorted(imported_modules(p) & (ENTRY_SCRIPTS - {p.stem}))
                 for p in modules}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_entry_scripts_exist_and_run_as_commands():
    for name in ENTRY_SCRIPTS:
        assert 'if __name__ == "__main__":' in (ROOT / f"{name}.py").read_text(encoding="utf-8"), name
