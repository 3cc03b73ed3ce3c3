"""A tiny tool-calling SFT set the project writes itself (OpenAI chat layout: `tools`, assistant `tool_calls`,
`tool` results), read back through data_process.readers' `openai_tools_jsonl` converter. tests/test_serve.py
fine-tunes a tiny model on it for a few steps and drives the official openai client's tool loop against it."""
import json
from pathlib import Path

DRUG_TOOL = {"type": "function", "function": {
    "name": "lookup_dose", "description": "查询药物的常用成人剂量",
    "parameters": {"type": "object", "properties": {"drug": {"type": "string"}}, "required": ["drug"]}}}
DOSES = {"布洛芬": "成人每次200-400毫克，每日不超过1200毫克", "对乙酰氨基酚": "成人每次500毫克，每日不超过2克",
         "阿莫西林": "成人每次500毫克，每8小时一次"}


def answer(drug: str) -> str:
    return f"{drug}{DOSES[drug]}。"


def tool_conversations() -> list[dict]:
    rows = []
    for i, (drug, dose) in enumerate(DOSES.items()):
        call = {"id": f"call_{i}", "type": "function",
                "function": {"name": "lookup_dose", "arguments": json.dumps({"drug": drug}, ensure_ascii=False)}}
        rows.append({"tools": [DRUG_TOOL], "messages": [
            {"role": "user", "content": f"{drug}怎么吃？"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": dose},
            {"role": "assistant", "content": answer(drug)}]})
    return rows


def write_tool_dataset(path: Path) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in tool_conversations()),
                    encoding="utf-8")
    return path
