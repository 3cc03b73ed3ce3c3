"""PII scrubbing (data_process/pii.py): planted values of every type inside real text are all replaced by their
typed placeholder; ordinary numbers (doses, lab values, dates, years, ICD codes, prices) are untouched."""
import random

import pytest

from data_process import pii
from data_process.clean import Cleaner
from data_process.readers import READERS
from data_process.recipe import CleanConfig

# Independent references: the ID example printed in GB 11643-1999 itself, and the card numbers the networks
# publish for testing (Visa 4111..., Mastercard 5555...4444, UnionPay 6212...), all valid by their own check digit.
PLANTED = [
    ("<ID>", "11010519491231002X"),
    ("<ID>", "440304200101011236"),
    ("<CARD>", "4111111111111111"),
    ("<CARD>", "5555 5555 5555 4444"),
    ("<CARD>", "6212 3456 7890 1232"),
    ("<PHONE>", "13812345678"),
    ("<PHONE>", "+86 139 1234 5678"),
    ("<PHONE>", "010-62345678"),
    ("<PHONE>", "(0571)8888 8888"),
    ("<PHONE>", "0755-2345678"),
    ("<PHONE>", "400-820-8820"),
    ("<EMAIL>", "zhang.wei_1990@163.com"),
    ("<EMAIL>", "doctor.li@hospital.org.cn"),
    ("<IP>", "192.168.100.23"),
    ("<URL>", "https://www.haodf.com/doctor/12345.html"),
    ("<URL>", "www.example.cn/ask?id=9"),
]
KEYWORDED = [   # QQ / WeChat only count after their keyword: the keyword stays, the id goes
    ("<QQ>", "QQ：", "1234567890"),
    ("<QQ>", "扣扣", "87654321"),
    ("<WECHAT>", "微信号：", "dr_wang2023"),
    ("<WECHAT>", "加V ", "abc_12345"),
    ("<WECHAT>", "VX:", "13912345678"),
]


def test_the_reference_values_pass_their_own_checks():
    assert pii.resident_id_valid("11010519491231002X") and pii.resident_id_valid("440304200101011236")
    assert not pii.resident_id_valid("110105194912310021")   # one digit off
    assert pii.luhn_valid("4111111111111111") and pii.luhn_valid("5555555555554444")
    assert pii.luhn_valid("6212345678901232") and not pii.luhn_valid("4111111111111112")


def dialogue_answers(samples, n):
    path = samples / "toyhom-medical-dialogue" / "样例_内科5000-6000.csv"
    out = []
    for r in READERS["medical_dialogue_csv"](path, path.name, None):
        if isinstance(r, dict):
            out.append(r["messages"][-1]["content"])
        if len(out) >= n:
            break
    return out


def test_planted_values_of_every_type_inside_real_dialogue_are_all_replaced(samples):
    rng = random.Random(0)
    answers = dialogue_answers(samples, 200)
    for i, answer in enumerate(answers):
        planted = PLANTED[i % len(PLANTED)]
        cut = rng.randrange(len(answer) + 1)
        # a Chinese full stop on both sides: the value is inside ordinary Chinese text, not glued to a digit
        left, right = answer[:cut] + "，联系方式", "。" + answer[cut:]
        placeholder, value = planted
        out, counts = pii.scrub(left + value + right)
        assert out == pii.scrub(left)[0] + placeholder + pii.scrub(right)[0], value
        assert counts[placeholder] >= 1
    for placeholder, keyword, value in KEYWORDED:
        text = answers[0] + "如有疑问请加我" + keyword + value + "。" + answers[1]
        out, counts = pii.scrub(text)
        assert out == answers[0] + "如有疑问请加我" + keyword + placeholder + "。" + answers[1]
        assert counts == {placeholder: 1}


def test_real_medical_dialogue_full_of_numbers_is_untouched(samples):
    """7,644 real patients' questions and doctors' answers: blood pressures (145/80, 180120), lab values
    (41350000, 4.1359e+007, 1.23×10′7), doses, dates: not one of them is PII."""
    path = samples / "toyhom-medical-dialogue" / "样例_内科5000-6000.csv"
    n = 0
    for r in READERS["medical_dialogue_csv"](path, path.name, None):
        if isinstance(r, dict):
            for m in r["messages"]:
                assert pii.scrub(m["content"]) == (m["content"], {}), m["content"][:200]
                n += 1
    assert n > 10_000


@pytest.mark.parametrize("text", [
    "阿莫西林胶囊0.5g，每日3次，连服7天；布洛芬缓释胶囊300mg，必要时服用，24小时不超过1200mg。",
    "血常规：白细胞12.5×10⁹/L，中性粒细胞百分比85.3%，血红蛋白135g/L，血小板210×10⁹/L，CRP 56.8mg/L。",
    "HBV-DNA 4.1359e+007 IU/ml，ALT 226 U/L，AST 100 U/L，胆碱酯酶12380 U/L，总胆红素17.1μmol/L。",
    "2023-09-01入院，2023.09.15出院，2023年10月8日复查；随访至2024/01/20。1998年确诊，病程25年。",
    "诊断：2型糖尿病（ICD-10 E11.900），原发性高血压（I10.x00），慢性胃炎K29.501，ICD-9-CM 39.9001。",
    "挂号费¥50.00，检查费￥1,299.00，药费共计3,456.78元，医保报销70%，自付1037.03元。",
    "血压180/120mmHg，心率96次/分，体重72.5kg，身高175cm，BMI 23.7，体温37.8℃。",
    "子宫大小约5.6×4.5×3.9cm，右附件区囊肿5.64.52.9，内膜厚度0.8cm。第1.2.3.4节讲述了诊断标准。",
    "股票代码600302.SH，样本量n=13812，随机数种子20230901，邮编100038，电话号码在另一页。",
    "本品批准文号国药准字H20013062，生产批号20230512，有效期至2025年05月。wxPython 4.2 与 QQplot 画图。",
])
def test_doses_lab_values_dates_icd_codes_and_prices_are_untouched(text):
    assert pii.scrub(text) == (text, {})


def test_cleaner_counts_by_type_and_audits_with_masked_values():
    cleaner = Cleaner(CleanConfig(pii=True), "zh")
    record = {"id": "c:1", "kind": "conv", "messages": [
        {"role": "user", "content": "医生您好，我的电话13812345678，身份证11010519491231002X，血压145/80。"},
        {"role": "assistant", "content": "您好，请加微信号：dr_wang2023 详细沟通，或发邮件到 doc@163.com。"}]}
    assert cleaner.clean(record) is None
    assert record["messages"][0]["content"] == "医生您好，我的电话<PHONE>，身份证<ID>，血压145/80。"
    assert record["messages"][1]["content"] == "您好，请加微信号：<WECHAT> 详细沟通，或发邮件到 <EMAIL>。"
    assert {k: v for k, v in cleaner.stats.items() if k.startswith("pii_")} == {
        "pii_phone": 1, "pii_id": 1, "pii_wechat": 1, "pii_email": 1}
    audit_text = repr(cleaner.audit)
    assert "13812345678" not in audit_text and "138******78" in audit_text   # the audit shows masked values only
