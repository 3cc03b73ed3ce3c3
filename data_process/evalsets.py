"""C-Eval and CMMLU multiple-choice files: the one parser that eval.py (scoring) and dedup.py (decontamination)
share, so every question eval scores is a question decontamination knows.

    from data_process import evalsets
    result = evalsets.read_questions(path)                 # format told by the header
    result.questions, result.rows, result.dropped          # Questions, data rows read, {reason: count}
    bench = evalsets.discover("corpora/eval/ceval")        # which splits exist, whether they have answers
    bench.scored_split, bench.shot_split                   # "val"/"dev" for C-Eval, "test"/"dev" for CMMLU
    evalsets.subject_file(bench.root, "dev", "law")        # exactly law_dev.csv, never law_and_ethics...
    evalsets.subject_zh("ceval", "physician")              # "医师资格" (the published subject tables)

Layouts, as the benchmarks publish them:
- C-Eval (ceval-exam.zip, hkust-nlp/ceval): `dev/ val/ test/<subject>_<split>.csv`, UTF-8, CRLF, header
  `id,question,A,B,C,D,answer` (+ `explanation` in dev). The official test split has an EMPTY answer column
  (answers are scored on the leaderboard server; some copies drop the column): its rows are still questions,
  with `answer` None.
- CMMLU (haonan-li/CMMLU data/): `dev/ test/<subject>.csv`, UTF-8, LF, header `,Question,A,B,C,D,Answer`
  (the first column an unnamed row index, used as the id).

A row is one of:
- a Question with `answer` "A".."D" (upper-cased, NFKC, so "a" and full-width "Ａ" count);
- a Question with `answer` None: the answer cell is empty or not one of A-D. `read_questions(...,
  need_answer=True)` (scoring: eval.py) drops these and counts them as "no_answer" / "bad_answer";
  `need_answer=False` (decontamination) keeps them, because the question and options are what leaks;
- dropped as "malformed" (a field count other than the header's: the columns cannot be trusted) or
  "no_question" (empty question cell).
Fully blank lines are not rows. `rows == len(questions) + sum(dropped.values())`, always. A file that is not
UTF-8, is empty, or whose header is neither layout is a ValueError naming the file.

Questions and options are stripped of surrounding whitespace (CRLF, stray spaces); their inner text (LaTeX,
`____` blanks, line breaks inside quoted cells) is kept as is.
"""
from __future__ import annotations

import csv
import logging
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

FORMATS = ("ceval", "cmmlu")
LETTERS = "ABCD"
SPLITS = ("dev", "val", "test")
HEADERS = {"ceval": ("id", "question", "A", "B", "C", "D", "answer"),
           "cmmlu": ("", "Question", "A", "B", "C", "D", "Answer")}


@dataclass
class Question:
    subject: str                  # the file's subject key: C-Eval "physician", CMMLU "college_medicine"
    split: str                    # "dev" | "val" | "test" | "" (a file outside a split folder)
    id: str                       # C-Eval's id column, CMMLU's index column
    question: str
    options: dict[str, str]       # {"A": ..., "B": ..., "C": ..., "D": ...}
    answer: str | None            # "A".."D", or None (C-Eval test: no answers published)
    explanation: str = ""         # C-Eval dev only
    file: str = ""
    line: int = 0                 # 1-based line where the row starts

    @property
    def option_list(self) -> list[str]:
        return [self.options[letter] for letter in LETTERS]

    @property
    def answer_text(self) -> str | None:
        return self.options[self.answer] if self.answer else None


@dataclass
class ReadResult:
    format: str
    questions: list[Question]
    rows: int                                          # data rows read (blank lines excluded)
    dropped: Counter = field(default_factory=Counter)  # reason -> rows

    @property
    def without_answer(self) -> int:
        return sum(q.answer is None for q in self.questions)


# ---------------------------------------------------------------------------------------------------------
# Reading one file
def detect_format(header: list[str]) -> str | None:
    """"ceval" or "cmmlu" from a CSV header (whitespace around names ignored), None for anything else."""
    names = tuple(h.strip() for h in header)
    if names == HEADERS["ceval"][:6] or (names[:7] == HEADERS["ceval"] and names[7:] in ((), ("explanation",))):
        return "ceval"          # (the first form: a C-Eval test file published without its answer column)
    if len(names) == 7 and names[1:] == HEADERS["cmmlu"][1:]:
        return "cmmlu"
    return None


def normalize_answer(cell: str) -> str | None:
    """"A".."D" from an answer cell ("b", "Ｂ", " B\\r" included), None if empty or anything else."""
    answer = unicodedata.normalize("NFKC", cell or "").strip().upper()
    return answer if len(answer) == 1 and answer in LETTERS else None


def split_of(path: Path) -> str:
    """The split a file belongs to: its folder's name if that is a split, else a C-Eval `_<split>` suffix."""
    path = Path(path)
    if path.parent.name in SPLITS:
        return path.parent.name
    return next((s for s in SPLITS if path.stem.endswith("_" + s)), "")


def subject_of(path: Path, fmt: str) -> str:
    """The subject key of a file: C-Eval `<subject>_<split>.csv` -> subject, CMMLU `<subject>.csv` -> subject."""
    stem = Path(path).stem
    if fmt == "ceval":
        for s in SPLITS:
            if stem.endswith("_" + s):
                return stem[: -len(s) - 1]
    return stem


def read_questions(path, fmt: str | None = None, *, need_answer: bool = True) -> ReadResult:
    """Every row of one C-Eval or CMMLU subject CSV. `fmt` None: told by the header; given: the header must
    match it. `need_answer`: drop (and count) rows without a valid answer, as scoring needs."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return _read(csv.reader(f), path, fmt, need_answer)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: eval CSVs must be UTF-8 (as C-Eval and CMMLU ship them): {e}") from None


def _read(reader, path: Path, fmt: str | None, need_answer: bool) -> ReadResult:
    header = next(reader, None)
    if header is None:
        raise ValueError(f"{path}: empty file, expected a C-Eval or CMMLU header")
    found = detect_format(header)
    if found is None or (fmt is not None and found != fmt):
        want = fmt or "C-Eval or CMMLU"
        raise ValueError(f"{path}: not a {want} CSV: header {header}; expected C-Eval "
                         f"'id,question,A,B,C,D,answer[,explanation]' or CMMLU ',Question,A,B,C,D,Answer'")
    fmt = found
    width = len(header)
    subject, split = subject_of(path, fmt), split_of(path)
    result = ReadResult(fmt, [], 0)
    line = reader.line_num + 1
    for row in reader:
        start, line = line, reader.line_num + 1
        if not any(cell.strip() for cell in row):
            continue                                    # a blank line is not a row
        result.rows += 1
        # a dev row may lack a trailing empty explanation cell; any other width shifts the columns
        if not (len(row) == width or (width == 8 and len(row) == 7)):
            _drop(result, "malformed", path, start, f"{len(row)} fields, the header has {width}")
            continue
        question = row[1].strip()
        if not question:
            _drop(result, "no_question", path, start, "empty question")
            continue
        cell = row[6] if width > 6 else ""
        answer = normalize_answer(cell)
        if answer is None and need_answer:
            reason = "no_answer" if not cell.strip() else "bad_answer"
            _drop(result, reason, path, start, f"answer {cell!r}")
            continue
        result.questions.append(Question(
            subject=subject, split=split, id=row[0].strip(), question=question,
            options={letter: row[2 + k].strip() for k, letter in enumerate(LETTERS)}, answer=answer,
            explanation=row[7].strip() if len(row) > 7 else "", file=str(path), line=start))
    return result


def _drop(result: ReadResult, reason: str, path: Path, line: int, detail: str) -> None:
    result.dropped[reason] += 1
    log.warning("%s:%d: %s row dropped (%s)", path, line, reason, detail)


# ---------------------------------------------------------------------------------------------------------
# A benchmark folder
@dataclass
class SplitInfo:
    name: str                         # "dev" | "val" | "test"
    files: dict[str, Path]            # subject -> file, sorted by subject
    rows: int = 0
    with_answer: int = 0

    @property
    def has_answers(self) -> bool:
        return self.with_answer > 0


@dataclass
class Benchmark:
    root: Path
    format: str
    splits: dict[str, SplitInfo]      # in SPLITS order, only the ones that exist

    @property
    def scored_split(self) -> str | None:
        """The split eval scores: test when it has answers (CMMLU), else val (C-Eval's answerless test)."""
        for name in ("test", "val"):
            if name in self.splits and self.splits[name].has_answers:
                return name
        return None

    @property
    def shot_split(self) -> str | None:
        return "dev" if "dev" in self.splits else None

    @property
    def subjects(self) -> list[str]:
        return sorted({s for info in self.splits.values() for s in info.files})

    def files(self) -> list[Path]:
        return [p for info in self.splits.values() for p in info.files.values()]


def discover(root, fmt: str | None = None) -> Benchmark:
    """The splits of a C-Eval or CMMLU folder (`root/{dev,val,test}/*.csv`), each file read once to see
    whether the split carries answers. `fmt` None: told by the first file's header."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"benchmark folder not found: {root}")
    splits = {}
    for name in SPLITS:
        paths = sorted((root / name).glob("*.csv")) if (root / name).is_dir() else []
        if not paths:
            continue
        info = SplitInfo(name, {})
        for p in paths:
            result = read_questions(p, fmt, need_answer=False)
            fmt = result.format
            subject = subject_of(p, fmt)
            if subject in info.files:
                raise ValueError(f"{root}/{name}: two files for subject {subject!r}: {info.files[subject].name}, {p.name}")
            info.files[subject] = p
            info.rows += result.rows
            info.with_answer += len(result.questions) - result.without_answer
        splits[name] = info
    if not splits:
        raise FileNotFoundError(f"{root}: no dev/, val/ or test/ folder with subject CSVs")
    return Benchmark(root, fmt, splits)


def subject_file(root, split: str, subject: str, fmt: str | None = None) -> Path | None:
    """The file of exactly this subject in a split (C-Eval `<subject>_<split>.csv`, CMMLU `<subject>.csv`),
    or None. Exact names, not a prefix glob: `law` must never pick `law_and_ethics`."""
    d = Path(root) / split
    names = {"ceval": [f"{subject}_{split}.csv"], "cmmlu": [f"{subject}.csv"]}
    for name in names[fmt] if fmt else names["ceval"] + names["cmmlu"]:
        if (d / name).is_file():
            return d / name
    return None


def subject_zh(fmt: str, subject: str) -> str:
    """The subject's published Chinese name (what the C-Eval/CMMLU prompts say), else the key itself."""
    table = CEVAL_SUBJECTS if fmt == "ceval" else CMMLU_SUBJECTS
    return table[subject][1] if subject in table else subject


def subject_category(fmt: str, subject: str) -> str:
    table = CEVAL_SUBJECTS if fmt == "ceval" else CMMLU_SUBJECTS
    return table[subject][2] if subject in table else ""


# ---------------------------------------------------------------------------------------------------------
# The published subject tables.
# C-Eval: subject_mapping.json of hkust-nlp/ceval (key -> [English name, Chinese name, category]), 52 subjects.
CEVAL_SUBJECTS: dict[str, tuple[str, str, str]] = {
    "computer_network": ("Computer Network", "计算机网络", "STEM"),
    "operating_system": ("Operating System", "操作系统", "STEM"),
    "computer_architecture": ("Computer Architecture", "计算机组成", "STEM"),
    "college_programming": ("College Programming", "大学编程", "STEM"),
    "college_physics": ("College Physics", "大学物理", "STEM"),
    "college_chemistry": ("College Chemistry", "大学化学", "STEM"),
    "advanced_mathematics": ("Advanced Mathematics", "高等数学", "STEM"),
    "probability_and_statistics": ("Probability and Statistics", "概率统计", "STEM"),
    "discrete_mathematics": ("Discrete Mathematics", "离散数学", "STEM"),
    "electrical_engineer": ("Electrical Engineer", "注册电气工程师", "STEM"),
    "metrology_engineer": ("Metrology Engineer", "注册计量师", "STEM"),
    "high_school_mathematics": ("High School Mathematics", "高中数学", "STEM"),
    "high_school_physics": ("High School Physics", "高中物理", "STEM"),
    "high_school_chemistry": ("High School Chemistry", "高中化学", "STEM"),
    "high_school_biology": ("High School Biology", "高中生物", "STEM"),
    "middle_school_mathematics": ("Middle School Mathematics", "初中数学", "STEM"),
    "middle_school_biology": ("Middle School Biology", "初中生物", "STEM"),
    "middle_school_physics": ("Middle School Physics", "初中物理", "STEM"),
    "middle_school_chemistry": ("Middle School Chemistry", "初中化学", "STEM"),
    "veterinary_medicine": ("Veterinary Medicine", "兽医学", "STEM"),
    "college_economics": ("College Economics", "大学经济学", "Social Science"),
    "business_administration": ("Business Administration", "工商管理", "Social Science"),
    "marxism": ("Marxism", "马克思主义基本原理", "Social Science"),
    "mao_zedong_thought": ("Mao Zedong Thought", "毛泽东思想和中国特色社会主义理论体系概论", "Social Science"),
    "education_science": ("Education Science", "教育学", "Social Science"),
    "teacher_qualification": ("Teacher Qualification", "教师资格", "Social Science"),
    "high_school_politics": ("High School Politics", "高中政治", "Social Science"),
    "high_school_geography": ("High School Geography", "高中地理", "Social Science"),
    "middle_school_politics": ("Middle School Politics", "初中政治", "Social Science"),
    "middle_school_geography": ("Middle School Geography", "初中地理", "Social Science"),
    "modern_chinese_history": ("Modern Chinese History", "近代史纲要", "Humanities"),
    "ideological_and_moral_cultivation": ("Ideological and Moral Cultivation", "思想道德修养与法律基础", "Humanities"),
    "logic": ("Logic", "逻辑学", "Humanities"),
    "law": ("Law", "法学", "Humanities"),
    "chinese_language_and_literature": ("Chinese Language and Literature", "中国语言文学", "Humanities"),
    "art_studies": ("Art Studies", "艺术学", "Humanities"),
    "professional_tour_guide": ("Professional Tour Guide", "导游资格", "Humanities"),
    "legal_professional": ("Legal Professional", "法律职业资格", "Humanities"),
    "high_school_chinese": ("High School Chinese", "高中语文", "Humanities"),
    "high_school_history": ("High School History", "高中历史", "Humanities"),
    "middle_school_history": ("Middle School History", "初中历史", "Humanities"),
    "civil_servant": ("Civil Servant", "公务员", "Other"),
    "sports_science": ("Sports Science", "体育学", "Other"),
    "plant_protection": ("Plant Protection", "植物保护", "Other"),
    "basic_medicine": ("Basic Medicine", "基础医学", "Other"),
    "clinical_medicine": ("Clinical Medicine", "临床医学", "Other"),
    "urban_and_rural_planner": ("Urban and Rural Planner", "注册城乡规划师", "Other"),
    "accountant": ("Accountant", "注册会计师", "Other"),
    "fire_engineer": ("Fire Engineer", "注册消防工程师", "Other"),
    "environmental_impact_assessment_engineer": ("Environmental Impact Assessment Engineer", "环境影响评价工程师", "Other"),
    "tax_accountant": ("Tax Accountant", "税务师", "Other"),
    "physician": ("Physician", "医师资格", "Other"),
}

# CMMLU: name_en2zh, subcategories and categories of haonan-li/CMMLU src/categories.py, 67 subjects.
# Category: the one of STEM / Humanities / Social Science / Other holding the subject's first subcategory;
# the subjects CMMLU also files under "China specific" say so in the fourth field.
CMMLU_SUBJECTS: dict[str, tuple[str, str, str, bool]] = {
    "agronomy": ("Agronomy", "农学", "Other", False),
    "anatomy": ("Anatomy", "解剖学", "STEM", False),
    "ancient_chinese": ("Ancient Chinese", "古汉语", "Social Science", True),
    "arts": ("Arts", "艺术学", "Humanities", False),
    "astronomy": ("Astronomy", "天文学", "STEM", False),
    "business_ethics": ("Business Ethics", "商业伦理", "Social Science", False),
    "chinese_civil_service_exam": ("Chinese Civil Service Exam", "中国公务员考试", "Social Science", True),
    "chinese_driving_rule": ("Chinese Driving Rule", "中国驾驶规则", "Other", True),
    "chinese_food_culture": ("Chinese Food Culture", "中国饮食文化", "Social Science", True),
    "chinese_foreign_policy": ("Chinese Foreign Policy", "中国外交政策", "Social Science", True),
    "chinese_history": ("Chinese History", "中国历史", "Humanities", True),
    "chinese_literature": ("Chinese Literature", "中国文学", "Humanities", True),
    "chinese_teacher_qualification": ("Chinese Teacher Qualification", "中国教师资格", "Social Science", True),
    "clinical_knowledge": ("Clinical Knowledge", "临床知识", "Other", False),
    "college_actuarial_science": ("College Actuarial Science", "大学精算学", "STEM", False),
    "college_education": ("College Education", "大学教育学", "Social Science", False),
    "college_engineering_hydrology": ("College Engineering Hydrology", "大学工程水文学", "STEM", False),
    "college_law": ("College Law", "大学法律", "Humanities", False),
    "college_mathematics": ("College Mathematics", "大学数学", "STEM", False),
    "college_medical_statistics": ("College Medical Statistics", "大学医学统计", "STEM", False),
    "college_medicine": ("College Medicine", "大学医学", "Other", False),
    "computer_science": ("Computer Science", "计算机科学", "STEM", False),
    "computer_security": ("Computer Security", "计算机安全", "Other", False),
    "conceptual_physics": ("Conceptual Physics", "概念物理学", "STEM", False),
    "construction_project_management": ("Construction Project Management", "建设工程管理", "Other", True),
    "economics": ("Economics", "经济学", "Social Science", False),
    "education": ("Education", "教育学", "Social Science", False),
    "electrical_engineering": ("Electrical Engineering", "电气工程", "STEM", False),
    "elementary_chinese": ("Elementary Chinese", "小学语文", "Social Science", True),
    "elementary_commonsense": ("Elementary Commonsense", "小学常识", "Other", True),
    "elementary_information_and_technology": ("Elementary Information and Technology", "小学信息技术", "Other", False),
    "elementary_mathematics": ("Elementary Mathematics", "初等数学", "STEM", False),
    "ethnology": ("Ethnology", "民族学", "Social Science", True),
    "food_science": ("Food Science", "食品科学", "Other", False),
    "genetics": ("Genetics", "遗传学", "STEM", False),
    "global_facts": ("Global Facts", "全球事实", "Humanities", False),
    "high_school_biology": ("High School Biology", "高中生物", "STEM", False),
    "high_school_chemistry": ("High School Chemistry", "高中化学", "STEM", False),
    "high_school_geography": ("High School Geography", "高中地理", "Social Science", False),
    "high_school_mathematics": ("High School Mathematics", "高中数学", "STEM", False),
    "high_school_physics": ("High School Physics", "高中物理学", "STEM", False),
    "high_school_politics": ("High School Politics", "高中政治", "Social Science", True),
    "human_sexuality": ("Human Sexuality", "人类性行为", "Other", False),
    "international_law": ("International Law", "国际法学", "Humanities", False),
    "journalism": ("Journalism", "新闻学", "Social Science", False),
    "jurisprudence": ("Jurisprudence", "法理学", "Humanities", False),
    "legal_and_moral_basis": ("Legal and Moral Basis", "法律与道德基础", "Other", False),
    "logical": ("Logical", "逻辑学", "Humanities", False),
    "machine_learning": ("Machine Learning", "机器学习", "STEM", False),
    "management": ("Management", "管理学", "Social Science", False),
    "marketing": ("Marketing", "市场营销", "Social Science", False),
    "marxist_theory": ("Marxist Theory", "马克思主义理论", "Humanities", False),
    "modern_chinese": ("Modern Chinese", "现代汉语", "Social Science", True),
    "nutrition": ("Nutrition", "营养学", "Other", False),
    "philosophy": ("Philosophy", "哲学", "Humanities", False),
    "professional_accounting": ("Professional Accounting", "专业会计", "Social Science", False),
    "professional_law": ("Professional Law", "专业法学", "Humanities", False),
    "professional_medicine": ("Professional Medicine", "专业医学", "Other", False),
    "professional_psychology": ("Professional Psychology", "专业心理学", "Social Science", False),
    "public_relations": ("Public Relations", "公共关系", "Social Science", False),
    "security_study": ("Security Study", "安全研究", "Social Science", False),
    "sociology": ("Sociology", "社会学", "Social Science", False),
    "sports_science": ("Sports Science", "体育学", "Other", False),
    "traditional_chinese_medicine": ("Traditional Chinese Medicine", "中医中药", "Other", True),
    "virology": ("Virology", "病毒学", "STEM", False),
    "world_history": ("World History", "世界历史", "Humanities", False),
    "world_religions": ("World Religions", "世界宗教", "Humanities", False),
}
