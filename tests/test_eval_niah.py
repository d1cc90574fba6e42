"""Needle in a haystack: templates, insertion, scoring, the grid with scripted oracles, bad input, the heatmap, the
CLI, and (slow) a tiny model trained on value retrieval that finds the needle."""
import json
import random
import re
import time

import pytest
import torch

from megatron_lc.cli import main
from megatron_lc.configtools import ConfigError
from megatron_lc.data.stdlib_text import stdlib_docstring_text
from megatron_lc.data.tokenizer import Bytes
from megatron_lc.eval import niah

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


@pytest.mark.parametrize("positions", [
    {"dual_chunk_attention": {"chunk_size": 96, "local_size": 16}},
    {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 96}},
])
def test_cli_runs_dca_and_yarn_models(tmp_path, positions):
    """`eval niah` on a model folder whose config carries DCA or YaRN: the positions survive save/load, the answers
    are the model's own greedy decode with them (and differ from plain RoPE's on some cell: they are in effect)."""
    from megatron_lc.model import ModelConfig, Transformer, save_hf

    base = dict(vocab_size=260, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=16, init_std=0.3, max_position_embeddings=384, rope_theta=1e4, extra={"eos_token_id": 257})
    hay = tmp_path / "hay.txt"
    hay.write_text(PROSE)
    outputs = {}  # 2 lengths past DCA's chunk / YaRN's original window x 2 depths, 3 tokens: kept small (CPU time)
    for name, extra in (("plain", {}), ("scaled", positions)):
        save_hf(Transformer(ModelConfig(**base, **extra), seed=3), str(tmp_path / name))
        assert main(["eval", "niah", "--model", str(tmp_path / name), "--haystack", str(hay), "--lengths", "200,360",
                     "--depths", "0,100", "--max-new-tokens", "3", "--device", "cpu",
                     "--out", str(tmp_path / f"out_{name}")]) == 0
        results = json.loads((tmp_path / f"out_{name}" / "niah.json").read_text())
        outputs[name] = [c["output"] for c in results["cells"]]
    key = next(iter(positions))
    assert results["rope"][key] is not None
    # The CLI's answers (model loaded from its folder) equal the grid run on the in-memory model with those
    # positions: save/load kept them and the CLI decoded with them.
    model = Transformer(ModelConfig(**base, **positions), seed=3).eval()
    direct = niah.run_grid(niah.model_answer_fn(model, TOK, 3), TOK, niah.load_haystack(str(hay), TOK), [200, 360],
                           [0, 100], variant="value", max_new_tokens=3, seed=0)
    assert [c["output"] for c in direct["cells"]] == outputs["scaled"]
    assert outputs["plain"] != outputs["scaled"]
    assert any(outputs["scaled"])
    # The same positions given on the command line to the plain folder: the same answers.
    flag = "--" + key.replace("_", "-")
    assert main(["eval", "niah", "--model", str(tmp_path / "plain"), "--haystack", str(hay), "--lengths", "200,360",
                 "--depths", "0,100", "--max-new-tokens", "3", "--device", "cpu", flag, json.dumps(positions[key]),
                 "--out", str(tmp_path / "out_flag")]) == 0
    flagged = json.loads((tmp_path / "out_flag" / "niah.json").read_text())
    assert [c["output"] for c in flagged["cells"]] == outputs["scaled"]


def test_cli_bad_position_flags_are_usage_errors(tmp_path, capsys):
    folder = _tiny_model_folder(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["eval", "niah", "--model", folder, "--rope-scaling", '{"rope_type": "yarn", "factr": 4}'])
    assert e.value.code == 2 and "rope_scaling (yarn) needs ['factor']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["eval", "niah", "--model", folder, "--dual-chunk-attention", "{chunk_size: 8"])
    assert e.value.code == 2 and "not JSON" in capsys.readouterr().err


# ---- a real model ----------------------------------------------------------------------------------------------
TRAIN_LEN = 256
ANSWER_TOKENS = 9  # " " + 7 digits + EOS


def random_word_text(n_bytes, seed):
    """Filler of random sentences (5-12 words drawn from the stdlib docstrings' words, no digits or colons)."""
    words = sorted({w.lower() for w in re.findall(r"[A-Za-z]{2,10}", stdlib_docstring_text(300_000))})
    rng, sentences, size = random.Random(seed), [], 0
    while size < n_bytes:
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(5, 12))).capitalize() + "."
        sentences.append(sentence)
        size += len(sentence) + 1
    return " ".join(sentences)


def value_retrieval_sample(haystack, rng, ends):
    """A NIAH prompt built by the eval code itself (random depth and haystack window), then the answer and EOS:
    (input_ids, labels) of TRAIN_LEN tokens, loss on the answer only."""
    needle = niah.make_needle("value", rng)
    offset = rng.randrange(0, len(haystack) - TRAIN_LEN)
    prompt = niah.build_prompt(haystack[offset:offset + TRAIN_LEN], TRAIN_LEN, rng.uniform(0, 100), needle, TOK,
                               ANSWER_TOKENS, None, ends)
    answer = TOK.encode(" " + needle.answer) + [TOK.eos_token_id]
    ids = prompt.ids + answer
    return ids[:-1] + [TOK.eos_token_id], [-100] * (len(prompt.ids) - 1) + answer + [-100]


def phonebook_sample(haystack, rng):
    """Dense key-value recall: three "City: NNNNNNN." entries among short filler, then each city asked again in a
    random order, loss on the 7 digits and the period of every answer. One value-retrieval sample supervises 9
    tokens; this one 27, all of them copies, so a 2-layer model forms its induction heads in a minute rather than
    not at all in the budget (value retrieval alone stays at the first digit after 4000 steps)."""
    cities = rng.sample(niah.CITIES, 3)
    numbers = [str(rng.randrange(1_000_000, 10_000_000)) for _ in cities]
    ids, supervised = [], []

    def add(text, target):
        tokens = TOK.encode(text)
        ids.extend(tokens)
        supervised.extend([target] * len(tokens))

    for city, number in zip(cities, numbers):
        add(f"{city}: {number}. ", False)
        start = rng.randrange(0, len(haystack) - 80)
        add(" ".join(TOK.decode(haystack[start:start + 80]).split()[1:rng.randint(2, 5)]) + ". ", False)
    add("\n", False)
    for i in rng.sample(range(3), 3):
        add(f"{cities[i]}:", False)
        add(f" {numbers[i]}.", True)
        add("\n", False)
    assert len(ids) <= TRAIN_LEN
    labels = [ids[j + 1] if supervised[j + 1] else -100 for j in range(len(ids) - 1)]
    pad = TRAIN_LEN - len(ids)
    return ids + [TOK.eos_token_id] * pad, labels + [-100] * (pad + 1)


@pytest.mark.slow
def test_tiny_model_trained_on_value_retrieval_finds_the_needle(tmp_path):
    """A 2-layer model (hidden 64) trained for 3500 steps of 16 samples (~4-5 minutes on 2 cores) on passkey data
    (half value-retrieval prompts, half phonebook recall) scores >= 90% exact match through the `eval niah` code
    path at its training length, on filler text it never saw.

    Measured on 2 cores (2026-12-02), same seeds: 8 samples a step scored 1.000 in 148 s on one machine and 0.700 on
    another (CPU numerics differ, and at 8 samples the run is at the edge of learning the task); 16 a step: 1.000 on
    both (245 s, 329 s); 4 a step: 0.100; 16 a step for 1500 steps: 0.550."""
    import argparse

    from megatron_lc.eval.cli import add_niah_args, run_niah
    from megatron_lc.model import ModelConfig, Transformer, save_hf
    from megatron_lc.train.config import OptimSection, ScheduleSection
    from megatron_lc.train.optim import build_optimizer, build_scheduler

    start = time.perf_counter()
    torch.manual_seed(0)
    train_hay = TOK.encode(random_word_text(1_000_000, seed=1))
    (tmp_path / "eval_hay.txt").write_text(random_word_text(100_000, seed=2))
    cfg = ModelConfig(vocab_size=260, hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
                      num_kv_heads=4, rope_theta=1e4, max_position_embeddings=TRAIN_LEN, tie_word_embeddings=False,
                      extra={"eos_token_id": TOK.eos_token_id})
    model = Transformer(cfg, seed=0).train()
    steps, lr, rng, ends = 3500, 1e-3, random.Random(0), niah.SentenceEnds(TOK)
    optimizer = build_optimizer(model, OptimSection(lr=lr, weight_decay=0.0))
    scheduler = build_scheduler(optimizer, steps, ScheduleSection(kind="cosine", warmup_steps=steps // 20))
    for _ in range(steps):
        rows = [phonebook_sample(train_hay, rng) if rng.random() < 0.5 else
                value_retrieval_sample(train_hay, rng, ends) for _ in range(16)]
        loss = model(torch.tensor([r[0] for r in rows]), labels=torch.tensor([r[1] for r in rows]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    save_hf(model, str(tmp_path / "model"))
    trained = time.perf_counter() - start

    parser = argparse.ArgumentParser()
    add_niah_args(parser)
    args = parser.parse_args(["--model", str(tmp_path / "model"), "--haystack", str(tmp_path / "eval_hay.txt"),
                              "--lengths", str(TRAIN_LEN), "--depths", "0,25,50,75,100", "--trials", "4",
                              "--max-new-tokens", str(ANSWER_TOKENS), "--device", "cpu", "--out",
                              str(tmp_path / "out")])
    results = run_niah(args)
    print(f"trained {steps} steps in {trained:.0f} s; NIAH value retrieval at {TRAIN_LEN}: "
          f"{results['overall']:.3f} [{time.perf_counter() - start:.0f} s in all]")
    assert len(results["cells"]) == 20
    assert results["overall"] >= 0.9, results["cells"]
    assert (tmp_path / "out" / "niah.png").stat().st_size > 0
