"""The one C-Eval/CMMLU parser (data_process/evalsets.py), checked against pandas' CSV reader on the real sample
files (CRLF C-Eval with multi-line explanations and LaTeX, LF CMMLU), the answerless C-Eval test split, exact
subject-file matching, the published subject tables and bad input."""
import shutil

import pandas as pd
import pytest

from conftest import ROOT, SAMPLES
from data_process import evalsets

CEVAL = SAMPLES / "ceval-medical"
CMMLU = SAMPLES / "cmmlu-medical"


def pandas_rows(path):
    return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")


@pytest.mark.parametrize("path", sorted(CEVAL.glob("*/*.csv")) + sorted(CMMLU.glob("*/*.csv")),
                         ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}/{p.name}")
def test_every_real_row_reads_as_pandas_reads_it(path):
    result = evalsets.read_questions(path)
    df = pandas_rows(path)
    q_col, a_col = ("question", "answer") if result.format == "ceval" else ("Question", "Answer")
    assert result.rows == len(df) == len(result.questions) and not result.dropped
    for q, (_, row) in zip(result.questions, df.iterrows()):
        assert q.question == row[q_col].strip()
        assert q.options == {k: row[k].strip() for k in "ABCD"}
        assert q.answer == row[a_col].strip() and q.answer in "ABCD"
        assert q.id == str(row.iloc[0])
        assert q.split == path.parent.name
        if "explanation" in df.columns:
            assert q.explanation == row["explanation"].strip()
    assert result.format == ("ceval" if CEVAL in path.parents else "cmmlu")


def test_real_ceval_crlf_latex_blanks_and_multiline_explanations_survive():
    qs = {q.id: q for q in evalsets.read_questions(CEVAL / "dev/clinical_medicine_dev.csv").questions}
    q = qs["2"]
    assert q.question == "Ⅱ型呼吸衰竭的实验室指标是____" and q.subject == "clinical_medicine"
    assert q.options["C"] == "$PaO_2$ ＜60mmHg，$PaCO_2$ ＞50mmHg" and q.answer_text == q.options["C"]
    assert q.line == 5                                 # line 2-3 hold row 0 (a two-line explanation)
    assert all("\r" not in x for x in (q.question, *q.option_list))
    assert "\n" in qs["0"].explanation                 # a quoted multi-line cell stays one cell
    latex = [q for q in evalsets.read_questions(CMMLU / "test/college_medicine.csv").questions
             if "\\mathrm" in q.question + "".join(q.option_list)]
    assert len(latex) >= 3 and any(q.options["A"].startswith("$\\mathrm{CO}_2$") for q in latex)


def test_discover_finds_the_splits_and_which_carry_answers():
    c = evalsets.discover(CEVAL)
    assert c.format == "ceval" and list(c.splits) == ["dev", "val"] and c.scored_split == "val"
    assert set(c.splits["val"].files) == {"basic_medicine", "clinical_medicine", "physician", "veterinary_medicine"}
    m = evalsets.discover(CMMLU)
    assert m.format == "cmmlu" and list(m.splits) == ["dev", "test"] and m.scored_split == "test"
    assert m.shot_split == "dev" and len(m.splits["dev"].files) == 9


def _answerless_copy(src, dst, keep_column: bool):
    """A C-Eval test file as the official zip ships it: the answer column empty (or absent)."""
    df = pandas_rows(src)
    df = df.drop(columns=["answer"]) if not keep_column else df.assign(answer="")
    dst.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(dst, index=False, lineterminator="\r\n")


@pytest.mark.parametrize("keep_column", [True, False], ids=["empty-answer-column", "no-answer-column"])
def test_the_answerless_ceval_test_split_gives_questions_for_decontamination_not_for_scoring(tmp_path, keep_column):
    root = tmp_path / "ceval"
    shutil.copytree(CEVAL / "dev", root / "dev")
    shutil.copytree(CEVAL / "val", root / "val")
    for f in sorted((CEVAL / "val").glob("*.csv")):
        _answerless_copy(f, root / "test" / f.name.replace("_val", "_test"), keep_column)
    bench = evalsets.discover(root)
    assert list(bench.splits) == ["dev", "val", "test"]
    assert not bench.splits["test"].has_answers and bench.splits["val"].has_answers
    assert bench.scored_split == "val"
    path = root / "test" / "physician_test.csv"
    everything = evalsets.read_questions(path, "ceval", need_answer=False)
    assert everything.rows == 49 and len(everything.questions) == 49 and everything.without_answer == 49
    assert all(q.answer is None and q.split == "test" and q.subject == "physician" for q in everything.questions)
    scored = evalsets.read_questions(path, "ceval", need_answer=True)
    assert scored.questions == [] and scored.dropped == {"no_answer": 49}


def test_subject_files_match_exactly_never_by_prefix(tmp_path):
    for split, names in {"dev": ["law_dev.csv", "law_and_ethics_dev.csv", "legal_professional_dev.csv"],
                         "val": ["law_and_ethics_val.csv"]}.items():
        (tmp_path / "ceval" / split).mkdir(parents=True)
        for name in names:
            shutil.copy(CEVAL / "dev/physician_dev.csv", tmp_path / "ceval" / split / name)
    root = tmp_path / "ceval"
    assert evalsets.subject_file(root, "dev", "law", "ceval") == root / "dev/law_dev.csv"
    assert evalsets.subject_file(root, "val", "law", "ceval") is None
    assert evalsets.subject_of(root / "dev/law_and_ethics_dev.csv", "ceval") == "law_and_ethics"
    (tmp_path / "cmmlu" / "dev").mkdir(parents=True)
    for name in ("college_medicine.csv", "college_medical_statistics.csv"):
        shutil.copy(CMMLU / "dev/college_medicine.csv", tmp_path / "cmmlu/dev" / name)
    assert evalsets.subject_file(tmp_path / "cmmlu", "dev", "college_medic", "cmmlu") is None
    assert evalsets.subject_file(tmp_path / "cmmlu", "dev", "college_medicine") == tmp_path / "cmmlu/dev/college_medicine.csv"


def test_published_subject_tables_are_complete():
    assert len(evalsets.CEVAL_SUBJECTS) == 52 and len(evalsets.CMMLU_SUBJECTS) == 67
    assert {v[2] for v in evalsets.CEVAL_SUBJECTS.values()} == {"STEM", "Social Science", "Humanities", "Other"}
    assert {v[2] for v in evalsets.CMMLU_SUBJECTS.values()} == {"STEM", "Social Science", "Humanities", "Other"}
    # the subjects CMMLU's categories.py also files under "china specific"
    assert {k for k, v in evalsets.CMMLU_SUBJECTS.items() if v[3]} == {
        "ancient_chinese", "chinese_civil_service_exam", "chinese_driving_rule", "chinese_food_culture",
        "chinese_foreign_policy", "chinese_history", "chinese_literature", "chinese_teacher_qualification",
        "construction_project_management", "elementary_chinese", "elementary_commonsense", "ethnology",
        "high_school_politics", "modern_chinese", "traditional_chinese_medicine"}
    for root, fmt in ((CEVAL, "ceval"), (CMMLU, "cmmlu")):
        for subject in evalsets.discover(root).subjects:
            table = evalsets.CEVAL_SUBJECTS if fmt == "ceval" else evalsets.CMMLU_SUBJECTS
            assert subject in table
    assert evalsets.subject_zh("ceval", "physician") == "医师资格"
    assert evalsets.subject_zh("cmmlu", "traditional_chinese_medicine") == "中医中药"
    assert evalsets.subject_category("ceval", "law") == "Humanities"
    assert evalsets.subject_zh("cmmlu", "not_a_subject") == "not_a_subject"


def test_bad_rows_are_counted_by_reason_and_rows_always_add_up(tmp_path):
    path = tmp_path / "dev" / "x.csv"
    path.parent.mkdir()
    path.write_text(",Question,A,B,C,D,Answer\n0,好的问题,a,b,c,d,b\n1,缺答案的问题,a,b,c,d,\n"
                    "2,多了一列,a,b,c,d,A,extra\n3,,a,b,c,d,A\n4,答案不对,a,b,c,d,E\n\n5,全角答案,a,b,c,d,Ｃ\n",
                    encoding="utf-8")
    scored = evalsets.read_questions(path, "cmmlu")
    assert [(q.id, q.answer) for q in scored.questions] == [("0", "B"), ("5", "C")]
    assert scored.dropped == {"no_answer": 1, "malformed": 1, "no_question": 1, "bad_answer": 1}
    assert scored.rows == 6 == len(scored.questions) + sum(scored.dropped.values())
    everything = evalsets.read_questions(path, "cmmlu", need_answer=False)
    assert [(q.id, q.answer) for q in everything.questions] == [("0", "B"), ("1", None), ("4", None), ("5", "C")]
    assert everything.dropped == {"malformed": 1, "no_question": 1}
    assert everything.rows == len(everything.questions) + sum(everything.dropped.values())


def test_bad_files_are_clear_errors(tmp_path):
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("id,question,A,B,C,D,answer\n0,q,a,b,c,d,A\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not a cmmlu CSV"):
        evalsets.read_questions(wrong, "cmmlu")
    other = tmp_path / "other.csv"
    other.write_text("q,a\n1,2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not a C-Eval or CMMLU CSV"):
        evalsets.read_questions(other)
    gbk = tmp_path / "gbk.csv"
    gbk.write_bytes(",Question,A,B,C,D,Answer\n0,女性生殖腺是,卵巢,前庭大腺,前庭球,乳腺,A\n".encode("gbk"))
    with pytest.raises(ValueError, match="must be UTF-8"):
        evalsets.read_questions(gbk)
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        evalsets.read_questions(empty)
    with pytest.raises(FileNotFoundError, match="no dev/, val/ or test/"):
        evalsets.discover(tmp_path)


def test_the_projects_own_eval_files_are_in_the_real_layouts():
    ceval = evalsets.discover(ROOT / "corpora/eval/ceval")
    assert list(ceval.splits) == ["dev", "val", "test"] and not ceval.splits["test"].has_answers
    for f in ceval.files():
        data = f.read_bytes()
        assert data.count(b"\r\n") == data.count(b"\n")            # CRLF like the real C-Eval
        r = evalsets.read_questions(f, "ceval", need_answer=f.parent.name != "test")
        assert not r.dropped and len(r.questions) >= 5
    cmmlu = evalsets.discover(ROOT / "corpora/eval/cmmlu")
    assert list(cmmlu.splits) == ["dev", "test"] and cmmlu.scored_split == "test"
    for f in cmmlu.files():
        assert b"\r" not in f.read_bytes() and f.read_text(encoding="utf-8").startswith(",Question,A,B,C,D,Answer\n")
        r = evalsets.read_questions(f, "cmmlu")
        assert not r.dropped and len(r.questions) >= 5
