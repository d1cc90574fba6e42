"""360Zhinao cleaning rules: each rule removes a document built to violate it, clean documents stay, the report adds up."""
import pytest

from megatron_lc.configtools import ConfigError
from megatron_lc.data.clean import (
    RULE_ORDER,
    CleaningReport,
    CleaningRules,
    clean_documents,
    first_failed_rule,
    rule_values,
)

EN_LINES = [
    "The river runs through the old town before it reaches the sea.",
    "Fishermen have worked along its banks for more than three hundred years.",
    "In spring the water rises quickly, and the lower streets sometimes flood.",
    "Local records describe a bridge that was rebuilt twice after heavy storms.",
    "Today most visitors come for the market, which opens every Saturday morning.",
    "Stalls sell bread, cheese, honey and vegetables grown on nearby farms.",
    "A small museum near the harbour explains how the port changed over time.",
    "Its collection includes maps, tools, photographs and letters from sailors.",
]
CLEAN_EN = "\n".join(EN_LINES)

ZH_LINES = [
    "这条河流经古老的小镇，然后汇入大海，沿岸风景十分秀丽。",
    "三百多年来，渔民们一直在河岸边辛勤劳作，世代相传。",
    "每年春天河水上涨很快，低处的街道有时会被洪水淹没。",
    "当地的档案记载，那座石桥在暴风雨之后曾经重建过两次。",
    "如今大多数游客是为了每周六早上开放的集市而来到这里。",
    "港口附近有一座小型博物馆，介绍了港口多年来的变化。",
]
CLEAN_ZH = "\n".join(ZH_LINES)

CLEAN_MIXED = CLEAN_ZH + "\n" + CLEAN_EN

MENU_LINES = ["Home page.", "About us.", "Contact us.", "Our team.", "Latest news.", "Careers.", "Privacy policy.",
              "Sitemap.", "Welcome to the website of the regional history society and its archive."]
NAV_LINES = ["Home page", "About us", "Contact us", "Our team", "Latest news"]

# One document per rule, each built to pass every earlier rule and fail its own.
VIOLATORS = {
    "empty": " \n\n\t ",
    "punctuation_ratio": "|| ## == ++ -- ** !! ?? ;; :: ~~ @@ %% ^^ && {} [] <> home.\n>> >> >> << << menu |||",
    "ellipsis_paragraphs": "\n".join(p[:-1] + "..." if i % 2 else p for i, p in enumerate(CLEAN_EN.split("\n"))),
    "no_end_punctuation": "\n".join(p[:-1] for p in CLEAN_EN.split("\n")),
    "abnormal_word_length": "\n".join(
        " ".join(f"x{w}qzvbnmlkjhgfdsapoiu" for w in range(i, i + 6)) + "." for i in range(0, 48, 6)),
    "repeated_sentences": CLEAN_EN + "\n" + "\n".join(["Subscribe to our newsletter for weekly updates."] * 6),
    "short_paragraphs": "\n".join(MENU_LINES),
    "repeated_ngrams": "\n".join(f"Buy cheap replica watches online at shop {w}." for w in
                                 ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]),
}


def test_violators_cover_every_rule():
    assert set(VIOLATORS) == set(RULE_ORDER)


@pytest.mark.parametrize("rule", RULE_ORDER)
def test_each_rule_removes_its_violator(rule):
    assert first_failed_rule(VIOLATORS[rule]) == rule, rule_values(VIOLATORS[rule])


@pytest.mark.parametrize("text", [CLEAN_EN, CLEAN_ZH, CLEAN_MIXED], ids=["en", "zh", "mixed"])
def test_clean_documents_are_kept(text):
    assert first_failed_rule(text) is None, rule_values(text)


def test_short_words_also_abnormal():
    text = "\n".join(" ".join("abcdefgh"[j] for j in range(8)) + f" and {i}." for i in range(8))
    assert first_failed_rule(text) == "abnormal_word_length", rule_values(text)


def test_chinese_without_spaces_does_not_trip_word_length():
    # One 300-character "whitespace word" of Chinese: must not count as an abnormally long English word.
    text = "".join(CLEAN_ZH.split("\n"))
    assert " " not in text and len(text) > 150
    assert rule_values(text)["english_words"] == 0
    assert first_failed_rule(text) is None


def test_disabling_a_rule_passes_the_document_on():
    rules = CleaningRules(max_no_end_punct_ratio=None)
    assert first_failed_rule(VIOLATORS["no_end_punctuation"], rules) is None
    rules = CleaningRules(max_top_ngram_char_ratio=None)
    assert first_failed_rule(VIOLATORS["repeated_ngrams"], rules) is None


def test_document_charged_to_first_failed_rule():
    # Fails both no_end_punctuation (rule 4) and short_paragraphs (rule 7): charged to the earlier one.
    text = "\n".join(NAV_LINES)
    assert first_failed_rule(text, CleaningRules(max_no_end_punct_ratio=None)) == "short_paragraphs"
    assert first_failed_rule(text) == "no_end_punctuation"


def test_report_counts_add_up_and_stream_keeps_records():
    docs = [CLEAN_EN, {"text": CLEAN_ZH, "id": 7}] + list(VIOLATORS.values()) + [CLEAN_MIXED, VIOLATORS["empty"]]
    report = CleaningReport()
    kept = list(clean_documents(docs, CleaningRules(), report))
    assert kept == [CLEAN_EN, {"text": CLEAN_ZH, "id": 7}, CLEAN_MIXED]
    assert report.total == len(docs) == 12
    assert report.kept == 3
    assert report.consistent() and report.kept + sum(report.removed.values()) == report.total
    expected = {rule: 1 for rule in RULE_ORDER}
    expected["empty"] = 2
    assert report.as_dict()["removed"] == expected
    table = report.format()
    assert "repeated_ngrams" in table and "total" in table and "12" in table


def test_custom_text_of_and_bad_input():
    docs = [("a", CLEAN_EN), ("b", VIOLATORS["no_end_punctuation"])]
    assert [d[0] for d in clean_documents(docs, text_of=lambda d: d[1])] == ["a"]
    with pytest.raises(ConfigError, match="text_of"):
        list(clean_documents([42]))


@pytest.mark.parametrize("kwargs", [{"max_punctuation_ratio": 1.5}, {"short_paragraph_length": 0},
                                    {"min_mean_word_length": 12.0}, {"max_top_ngram_char_ratio": {2: -0.1}}])
def test_bad_thresholds_raise(kwargs):
    with pytest.raises(ConfigError):
        CleaningRules(**kwargs)
