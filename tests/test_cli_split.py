"""data_process.py's split-by-corpus mode (one machine's share of a large run) and its sub-commands."""
import data_process as _pkg  # noqa: F401  (the package, not the script)
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("data_process_cli", ROOT / "data_process.py")
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)


def test_corpus_filter_reads_only_the_named_corpora(tmp_path):
    out = tmp_path / "data"
    assert cli.main(["--steps", "read", "--corpus", "wiki_zh", "--corpus", "wudao", "--data-dir", str(out),
                     "--no-progress"]) == 0
    assert sorted(p.name for p in (out / "clean").iterdir() if p.is_dir()) == ["wiki_zh", "wudao"]
    assert (out / "clean" / "wiki_zh" / "manifest.json").is_file()


def test_corpus_filter_refuses_cross_corpus_steps_and_unknown_names(tmp_path, capsys):
    assert cli.main(["--steps", "read,dedup", "--corpus", "wiki_zh", "--data-dir", str(tmp_path)]) == 2
    assert "dedup" in capsys.readouterr().err
    assert cli.main(["--steps", "read", "--corpus", "no_such", "--data-dir", str(tmp_path)]) == 2
    assert "no_such" in capsys.readouterr().err


def test_download_subcommand_lists_sources(capsys):
    assert cli.main(["download", "--list"]) == 0
    assert "shibing624/medical" in capsys.readouterr().out
