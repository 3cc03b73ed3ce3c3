"""The download helper: offline behaviour only (CI has no network)."""

from data_process import download


def test_every_default_corpus_has_a_documented_source():
    names = {"wiki_zh", "baidubaike", "c4_zh", "wudao", "skypile", "medical_pretrain", "medical_finetune",
             "medical_reward", "guidelines", "magpie_dpo", "medical_dialogue", "minimind_pretrain",
             "minimind_sft", "minimind_r1", "minimind_dpo", "alpaca_zh", "belle", "sharegpt", "medical_books"}
    assert names <= set(download.BY_NAME)


def test_dry_run_names_the_target_folder_and_fetches_nothing(tmp_path, capsys):
    assert download.main(["wiki_zh", "baidubaike", "--dry-run", "--corpora-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path}/wiki_zh/" in out and "pleisto/wikipedia-cn-20230720-filtered" in out
    assert "download by hand" in out and "bwvb" in out
    assert list(tmp_path.iterdir()) == []


def test_unknown_corpus_is_a_clear_error(capsys):
    assert download.main(["no_such_corpus"]) == 2
    assert "unknown corpus no_such_corpus" in capsys.readouterr().err
