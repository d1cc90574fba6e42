"""Needle in a haystack: templates, insertion, scoring, the grid with scripted oracles, bad input, the heatmap, the
CLI, and (slow) a tiny model trained on value retrieval that finds the needle."""
import json
import random
import re

import pytest

from megatron_lc.cli import main
from megatron_lc.configtools import ConfigError
from megatron_lc.eval import niah
from megatron_lc.data.tokenizer import Bytes

TOK = Bytes()
# Several sentences per line, so depths land on different sentence ends; long enough for 4K-byte contexts.
PROSE = " ".join(f"Sentence number {i} talks about the weather in town {i % 13}." for i in range(400))


@pytest.fixture(scope="module")
def haystack():
    return TOK.encode(PROSE)


def context_oracle(prompt_ids):
    """Answers from the prompt: finds the needle sentence and returns what it says (a script, not a model)."""
    text = TOK.decode(prompt_ids)
    value = re.search(r"The special magic (.+?) number is: (\d+)\.", text)
    if value:
        return " " + value.group(2) + "."
    original = re.search(r"The best thing to do in San Francisco is (.+?\.)", text)
    return " " + original.group(1) if original else ""


def ignoring_oracle(prompt_ids):
    return " 0000000, I do not know."


def test_templates_are_the_specs():
    rng = random.Random(0)
    needle = niah.make_needle("value", rng)
    assert re.fullmatch(r"The special magic (.+) number is: \d{7}\.", needle.text)
    city = re.fullmatch(r"The special magic (.+) number is: .*", needle.text).group(1)
    assert needle.question == f"What is the special magic {city} number?"
    assert needle.answer_prefix == f"Answer: The special magic {city} number is:"
    original = niah.make_needle("original", rng)
    assert original.text == ("The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a "
                             "sunny day.")
    assert original.question == "What is the best thing to do in San Francisco?"


def test_scoring_functions():
    assert niah.exact_match(" 1234567.", "1234567") == 1.0
    assert niah.exact_match("1234567", "1234567") == 1.0
    assert niah.exact_match(" 12345678", "1234567") == 0.0  # a longer number is wrong
    assert niah.exact_match(" 7654321", "1234567") == 0.0
    assert niah.regex_match("Eat a SANDWICH, sit in Dolores park when sunny") == 1.0
    assert niah.regex_match("sunny Dolores sandwich") == 0.0  # order matters
    answer = "eat a sandwich and sit in Dolores Park on a sunny day."
    assert niah.word_recall("Eat a sandwich and sit in Dolores Park on a sunny day", answer) == 1.0
    assert niah.word_recall("a sandwich", answer) == pytest.approx(3 / 12)  # 'a' appears twice in the answer


def test_needle_goes_at_a_sentence_boundary(haystack):
    ends = niah.SentenceEnds(TOK)
    for depth in (0, 10, 33.3, 50, 77, 99.9, 100):
        i = niah.insertion_point(haystack, depth, ends)
        assert i <= max(0, int(len(haystack) * depth / 100)) or depth == 100
        assert i == 0 or TOK.decode(haystack[i - 1:i]) == "."  # right after a period
        # backed off to the previous sentence end, not further: no period between i and the target
        target = len(haystack) if depth == 100 else int(len(haystack) * depth / 100)
        assert "." not in TOK.decode(haystack[i:target])
    prompt = niah.build_prompt(haystack, 1000, 50, niah.make_needle("value", random.Random(1)), TOK, 10)
    text = TOK.decode(prompt.ids)
    assert re.search(r"\. The special magic .+ number is: \d{7}\. Sentence number", text)
    assert len(prompt.ids) + 10 == 1000  # prompt + answer budget fill the context exactly
    assert text.endswith("number is:")


@pytest.mark.parametrize("variant,scoring", [("value", "exact"), ("value", "regex"), ("original", "regex"),
                                             ("original", "recall")])
def test_oracle_reading_the_context_scores_all_and_one_ignoring_it_scores_zero(haystack, variant, scoring):
    lengths, depths = [300, 1000, 4000], [0, 25, 50, 75, 100]
    good = niah.run_grid(context_oracle, TOK, haystack, lengths, depths, variant=variant, scoring=scoring, trials=2)
    assert good["overall"] == 1.0 and all(v == 1.0 for row in good["mean"] for v in row)
    assert len(good["cells"]) == len(lengths) * len(depths) * 2
    bad = niah.run_grid(ignoring_oracle, TOK, haystack, lengths, depths, variant=variant, scoring=scoring, trials=2)
    assert bad["overall"] == 0.0
    assert all(c["prompt_tokens"] <= c["length"] for c in good["cells"])


def test_grid_splits_over_processes_and_merges_to_the_same_results(haystack):
    kwargs = {"lengths": [300, 700], "depths": [0, 50, 100], "trials": 3, "seed": 5}
    whole = niah.run_grid(context_oracle, TOK, haystack, **kwargs)
    parts = [niah.run_grid(context_oracle, TOK, haystack, rank=r, world_size=2, **kwargs) for r in range(2)]
    assert sorted(len(p["cells"]) for p in parts) == [9, 9]
    merged = niah.merge_results(parts)
    assert merged["cells"] == whole["cells"] and merged["mean"] == whole["mean"]


def test_bad_input_is_a_clear_error(haystack):
    needle = niah.make_needle("value", random.Random(0))
    with pytest.raises(ConfigError, match=r"context length 40 is too short for the needle .* at least \d+ tokens"):
        niah.build_prompt(haystack, 40, 50, needle, TOK, 10)
    with pytest.raises(ConfigError, match=r"depth 120.0 is outside 0-100.*--depths"):
        niah.run_grid(context_oracle, TOK, haystack, [500], [50, 120])
    with pytest.raises(ConfigError, match=r"depth -5 is outside 0-100"):
        niah.insertion_point(haystack, -5, niah.SentenceEnds(TOK))
    # the haystack is checked before any model call, and the error says how many tokens it has and needs
    calls = []
    with pytest.raises(ConfigError, match=rf"haystack has {len(haystack)} tokens; context length 100000 needs "
                                          rf"\d+: give a longer --haystack"):
        niah.run_grid(lambda ids: calls.append(ids) or "", TOK, haystack, [500, 100_000], [50])
    assert calls == []
    with pytest.raises(ConfigError, match="question-reserve 5 is smaller than the question's"):
        niah.build_prompt(haystack, 1000, 50, needle, TOK, 10, question_reserve=5)
    with pytest.raises(ConfigError, match="unknown NIAH variant 'needle'"):
        niah.run_grid(context_oracle, TOK, haystack, [500], [50], variant="needle")


def test_heatmap_png_opens(haystack, tmp_path):
    from PIL import Image

    results = niah.run_grid(lambda ids: context_oracle(ids) if len(ids) < 900 else "", TOK, haystack,
                            [300, 600, 1200, 2400], [0, 50, 100])
    path = tmp_path / "niah.png"
    niah.plot_heatmap(results, str(path), train_length=600)
    with Image.open(path) as image:
        assert image.size[0] > 200 and image.size[1] > 150
    niah.write_json(results, str(tmp_path / "r.json"))
    back = json.loads((tmp_path / "r.json").read_text())
    assert back["mean"][0] == [1.0, 1.0, 0.0, 0.0]


def _tiny_model_folder(tmp_path, max_pos=512):
    from megatron_lc.model import ModelConfig, Transformer, save_hf

    cfg = ModelConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                      num_kv_heads=1, max_position_embeddings=max_pos, rope_theta=1e4,
                      extra={"eos_token_id": 257})
    save_hf(Transformer(cfg, seed=0), str(tmp_path / "model"))
    return str(tmp_path / "model")


def test_cli_writes_json_and_heatmap(tmp_path, capsys):
    from PIL import Image

    hay = tmp_path / "hay.txt"
    hay.write_text(PROSE)
    out = tmp_path / "out"
    status = main(["eval", "niah", "--model", _tiny_model_folder(tmp_path), "--haystack", str(hay), "--lengths",
                   "256,512", "--depths", "0,50,100", "--max-new-tokens", "4", "--out", str(out)])
    assert status == 0
    results = json.loads((out / "niah.json").read_text())
    assert results["lengths"] == [256, 512] and results["depths"] == [0, 50, 100]
    assert results["train_length"] == 512 and len(results["cells"]) == 6
    with Image.open(out / "niah.png") as image:
        image.load()
    assert "mean score" in capsys.readouterr().out


def test_cli_bad_depth_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "niah", "--model", _tiny_model_folder(tmp_path), "--depths", "0,150", "--lengths", "256"])
    assert e.value.code == 2
    assert "depth 150.0 is outside 0-100" in capsys.readouterr().err


# ---- a real model ----------------------------------------------------------------------------------------------
TRAIN_LEN = 256
ANSWER_TOKENS = 9  # " " + 7 digits + EOS
