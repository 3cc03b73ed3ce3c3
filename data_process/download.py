"""Fetch the real upstream corpora into corpora/<corpus>/ (the one step that needs the network).

`python data_process.py download --list` shows where every corpus comes from; `python data_process.py download
wiki_zh medical_pretrain` fetches those that live on the Hugging Face hub (via huggingface_hub, resumable) and prints
instructions for the ones published only on Baidu pan, BAAI's site or GitHub. Nothing else in the project touches
the network: every other step reads local files.
"""
import argparse
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Source:
    corpus: str          # the recipe's corpus name (files land in corpora/<corpus>/)
    where: str           # "hf" (Hugging Face dataset) or "manual"
    repo: str            # dataset repo id, or a URL for manual downloads
    patterns: tuple = () # allow_patterns for hf downloads (empty: the whole repo)
    note: str = ""


SOURCES = [
    Source("wiki_zh", "hf", "pleisto/wikipedia-cn-20230720-filtered", ("*.json",),
           "one JSON array, ~250K articles, ~500 MB"),
    Source("baidubaike", "manual", "https://pan.baidu.com/s/1jIpCHnWLTNYabftavo3DVw (code: bwvb)", (),
           "563w_baidubaike.json (JSONL, 5.6M lines); the link baby-llama2-chinese gives"),
    Source("c4_zh", "manual", "https://pan.baidu.com/s/18O2Tj_PPB718K8gnaWrWUQ (zv4r), "
           "https://pan.baidu.com/s/11PTgtUfFXvpNkOige9Iw4w (sb83), https://pan.baidu.com/s/1248QfTS8QHPojYW-0fd5jQ (l89d)",
           (), "many JSONL files; the links baby-llama2-chinese gives"),
    Source("wudao", "manual", "https://data.baai.ac.cn/details/WuDaoCorporaText", (),
           "WuDaoCorpus2.0_base_200G: many files, each one JSON array (registration required)"),
    Source("skypile", "hf", "Skywork/SkyPile-150B", ("data/*.jsonl",),
           "JSONL {text}; 620 GB in all: pick a few files with --pattern"),
    Source("medical_pretrain", "hf", "shibing624/medical", ("pretrain/*",), "JSONL {text}"),
    Source("medical_finetune", "hf", "shibing624/medical", ("finetune/*",), "JSONL {instruction,input,output}"),
    Source("medical_reward", "hf", "shibing624/medical", ("reward/*",),
           "JSONL {question,response_chosen,response_rejected}"),
    Source("guidelines", "hf", "epfl-llm/guidelines", ("*.jsonl",), "JSONL, English clinical guidelines"),
    Source("magpie_dpo", "hf", "Magpie-Align/MagpieLM-DPO-Data-v0.1", ("data/*.parquet",),
           "parquet shards, 196K train + 4K test"),
    Source("medical_dialogue", "manual", "https://github.com/Toyhom/Chinese-medical-dialogue-data", (),
           "six department CSVs in Data_数据/, GB18030 (git clone the repository)"),
    Source("minimind_pretrain", "hf", "jingyaogong/minimind_dataset", ("pretrain_hq.jsonl",),
           "also on ModelScope: gongjy/minimind_dataset"),
    Source("minimind_sft", "hf", "jingyaogong/minimind_dataset", ("sft_mini_512.jsonl",), ""),
    Source("minimind_r1", "hf", "jingyaogong/minimind_dataset", ("r1_mix_1024.jsonl",), ""),
    Source("minimind_dpo", "hf", "jingyaogong/minimind_dataset", ("dpo.jsonl",), ""),
    Source("alpaca_zh", "hf", "shibing624/alpaca-zh", ("*.json",), "JSON array {instruction,input,output}"),
    Source("belle", "hf", "BelleGroup/train_0.5M_CN", ("*.json",), "JSONL {instruction,input,output}"),
    Source("sharegpt", "hf", "shibing624/sharegpt_gpt4", ("*.jsonl",), "ShareGPT JSONL {conversations:[{from,value}]}"),
    Source("medical_books", "manual", "https://github.com/shibing624/MedicalGPT/tree/main/data/pretrain", (),
           "plain text, one paragraph per line (or your own books)"),
    Source("ceval", "hf", "ceval/ceval-exam", ("*.zip",), "unzip into corpora/eval/ceval/{dev,val,test}/"),
    Source("cmmlu", "hf", "haonan-li/cmmlu", ("*.zip",), "unzip into corpora/eval/cmmlu/{dev,test}/"),
]
BY_NAME = {s.corpus: s for s in SOURCES}


def target_dir(corpora_dir: Path, source: Source) -> Path:
    if source.corpus in ("ceval", "cmmlu"):
        return corpora_dir / "eval" / source.corpus
    return corpora_dir / source.corpus


def fetch(source: Source, corpora_dir: Path, patterns=None, dry_run=False) -> str:
    """Download one corpus from the hub into its folder; return what was done (or what to do by hand)."""
    dest = target_dir(corpora_dir, source)
    if source.where == "manual":
        return f"{source.corpus}: download by hand from {source.repo} into {dest}/ ({source.note})"
    patterns = list(patterns or source.patterns) or None
    if dry_run:
        return f"{source.corpus}: would fetch {source.repo} {patterns or '(all files)'} into {dest}/"
    try:
        from huggingface_hub import snapshot_download  # installed with transformers
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency (pyproject.toml)
        raise SystemExit(f"huggingface_hub is needed to download: {e}")
    dest.mkdir(parents=True, exist_ok=True)
    snapshot_download(repo_id=source.repo, repo_type="dataset", allow_patterns=patterns, local_dir=str(dest))
    return f"{source.corpus}: fetched {source.repo} into {dest}/"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="data_process.py download", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpora", nargs="*", help="corpus names (see --list)")
    p.add_argument("--list", action="store_true", help="list every corpus and where it comes from")
    p.add_argument("--corpora-dir", type=Path, default=Path("corpora"), help="where raw corpora go (default: corpora)")
    p.add_argument("--pattern", action="append", help="override the files to fetch (glob, repeatable)")
    p.add_argument("--dry-run", action="store_true", help="say what would be fetched, fetch nothing")
    args = p.parse_args(argv)
    if args.list or not args.corpora:
        for s in SOURCES:
            print(f"{s.corpus:18s} {s.where:6s} {s.repo}  {s.note}")
        return 0
    unknown = [c for c in args.corpora if c not in BY_NAME]
    if unknown:
        print(f"error: unknown corpus {', '.join(unknown)}; known: {', '.join(BY_NAME)}", file=sys.stderr)
        return 2
    for name in args.corpora:
        print(fetch(BY_NAME[name], args.corpora_dir, args.pattern, args.dry_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
