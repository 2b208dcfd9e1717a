#!/usr/bin/env python3
"""Chinese text normalization: this server's normalize_text against WeTextProcessing's runtime (`wetext`), on
sentences written down here with the reading a Mandarin speaker expects.

    .venv/bin/python tools/compare_chinese_normalizers.py             # this server only
    PYTHONPATH=/path/with/wetext .venv/bin/python tools/compare_chinese_normalizers.py   # both, side by side

A reading counts as right when its words equal the expected ones (spaces and punctuation aside: a pause between
the groups of a phone number is no different reading). Prints each sentence that either gets wrong, then the
totals and the time per sentence.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import server  # noqa: E402

# (written, the reading a Mandarin speaker expects, other readings as good). The first set was written before
# comparing; the second ("later") once this server's misses on the first were known and before they were fixed, to
# check those fixes on sentences they were not made for.
SENTENCES = [
    ("今天气温25℃。", "今天气温二十五摄氏度。"),
    ("请拨打110报警。", "请拨打幺幺零报警。"),
    ("我的手机号是13800138000。", "我的手机号是幺三八零零幺三八零零零。", "我的手机号是一三八零零一三八零零零。"),
    ("会议定于2024年3月15日举行。", "会议定于二零二四年三月十五日举行。"),
    ("下午3:30开会。", "下午三点三十分开会。"),
    ("这件衣服价格是¥199。", "这件衣服价格是一百九十九元。"),
    ("销售额增长了50%。", "销售额增长了百分之五十。"),
    ("请翻到第3章。", "请翻到第三章。"),
    ("我买了2个苹果。", "我买了两个苹果。"),
    ("圆周率约等于3.14。", "圆周率约等于三点一四。"),
    ("气温降到了-12度。", "气温降到了负十二度。"),
    ("这座城市有1,234,567人。", "这座城市有一百二十三万四千五百六十七人。"),
    ("他跑了5km。", "他跑了五公里。"),
    ("比分是3:2。", "比分是三比二。"),
    ("他出生于1998年。", "他出生于一九九八年。"),
    ("现在是12:05。", "现在是十二点零五分。"),
    ("这个包重2.5kg。", "这个包重二点五千克。"),
    ("每天学习2小时。", "每天学习两小时。"),
    ("会议室在3楼。", "会议室在三楼。"),
    ("大约需要3到5天。", "大约需要三到五天。"),
    ("需要3-5天。", "需要三到五天。"),
    ("一半是1/2。", "一半是二分之一。"),
    ("他考了98分。", "他考了九十八分。"),
    ("电话：010-12345678。", "电话：零幺零幺二三四五六七八。", "电话：零一零一二三四五六七八。"),
    ("日期是2024-03-15。", "日期是二零二四年三月十五日。"),
    ("这台电脑售价$999。", "这台电脑售价九百九十九美元。"),
    ("他今年18岁。", "他今年十八岁。"),
    ("打120叫救护车。", "打幺二零叫救护车。"),
    ("速度达到120km/h。", "速度达到一百二十公里每小时。", "速度达到每小时一百二十公里。"),
    ("明天最高温度30°C。", "明天最高温度三十摄氏度。"),
    ("他得了第1名。", "他得了第一名。"),
    ("共有100000人参加。", "共有十万人参加。"),
    ("投资2.5亿元。", "投资二点五亿元。"),
    ("喝约0.5升水。", "喝约零点五升水。"),
    ("5月1日是劳动节。", "五月一日是劳动节。"),
    ("9:00上班。", "九点上班。"),
]
LATER_SENTENCES = [
    ("本次活动共有3000名观众。", "本次活动共有三千名观众。"),
    ("下载速度是100MB每秒。", "下载速度是一百兆字节每秒。"),
    ("他花了¥35.5买书。", "他花了三十五点五元买书。"),
    ("2023年经济增长5.2%。", "二零二三年经济增长百分之五点二。"),
    ("请于18:00前到达。", "请于十八点前到达。"),
    ("火警电话是119。", "火警电话是幺幺九。", "火警电话是一一九。"),
    ("第2届运动会开幕了。", "第二届运动会开幕了。"),
    ("他跑了3-4圈。", "他跑了三到四圈。"),
    ("比赛以2:1结束。", "比赛以二比一结束。"),
    ("三分之二写作2/3。", "三分之二写作三分之二。"),
    ("水温是-5℃。", "水温是负五摄氏度。"),
    ("他住在5楼502室。", "他住在五楼五零二室。"),
    ("明天8:30出发。", "明天八点三十分出发。", "明天八点半出发。"),
    ("这本书有250页。", "这本书有二百五十页。", "这本书有两百五十页。"),
    ("人口约1.4亿。", "人口约一点四亿。"),
    ("他买了2斤苹果。", "他买了两斤苹果。"),
    ("成绩提高了20%-30%。", "成绩提高了百分之二十到百分之三十。"),
    ("2008年8月8日晚上8点", "二零零八年八月八日晚上八点"),
    ("电视机售价4999元。", "电视机售价四千九百九十九元。"),
    ("他打了3次电话。", "他打了三次电话。"),
    ("拨打12345热线。", "拨打幺二三四五热线。", "拨打一二三四五热线。"),
    ("距离目的地还有15公里。", "距离目的地还有十五公里。"),
    ("1/4的人同意。", "四分之一的人同意。"),
]

_NOT_SPOKEN = re.compile(r"[\s\W_]+")


def words(text: str) -> str:
    return _NOT_SPOKEN.sub("", text)


def score(name: str, normalize, sentences: list[tuple[str, ...]]) -> tuple[int, float, list[str]]:
    normalize(sentences[0][0])   # loads what it loads on first use
    right, wrong, started = 0, [], time.perf_counter()
    for written, *readings in sentences:
        got = normalize(written)
        if words(got) in {words(reading) for reading in readings}:
            right += 1
        else:
            wrong.append(f"  {name}: {written} -> {got}   (expected {readings[0]})")
    return right, (time.perf_counter() - started) / len(sentences) * 1000, wrong


def main() -> None:
    normalizers = {"server.normalize_text": lambda text: server.normalize_text(text, "zh")}
    try:
        from wetext import Normalizer
    except ImportError:
        print("wetext is not installed: only this server's normalizer is measured")
    else:
        normalizers["wetext 0.1.8 (zh tn)"] = Normalizer(lang="zh", operator="tn").normalize
    for title, sentences in (("first set", SENTENCES), ("later set", LATER_SENTENCES)):
        results = {name: score(name.split()[0], normalize, sentences) for name, normalize in normalizers.items()}
        print(f"\n== {title}: {len(sentences)} sentences")
        for _, _, wrong in results.values():
            print("\n".join(wrong))
        print(f"{'normalizer':<24} {'right':>8} {'ms/sentence':>12}")
        for name, (right, ms, _) in results.items():
            print(f"{name:<24} {right:>3}/{len(sentences):<4} {ms:>12.2f}")


if __name__ == "__main__":
    main()
