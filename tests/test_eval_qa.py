"""``megatron-lc eval qa``: LongBench's EM / token F1 written out by hand, prompts of both input forms, middle
truncation, and the command end to end (a tiny random model; a scripted oracle for F1 100 / 0)."""
import importlib.util
import json
import os

import pytest
import torch

from megatron_lc.cli import main
from megatron_lc.configtools import ConfigError
from megatron_lc.data.tokenizer import Bytes
from megatron_lc.eval import qa

# (prediction, gold answers, EM, F1), worked out by hand from LongBench's normalisation: lowercase, drop ASCII
# punctuation, the words a/an/the become spaces, whitespace collapses; F1 over token multisets, max over answers.
CASES = [
    ("Paris", ["Paris"], 100, 100),
    ("paris.", ["Paris"], 100, 100),                        # case and a full stop
    ("The Paris", ["Paris"], 100, 100),                     # an article goes
    ("an apple a day", ["apple day"], 100, 100),            # all three articles go
    ("theatre", ["the atre"], 0, 0),                        # 'the' inside a word stays; 'the atre' -> 'atre'
    ("Paris, France", ["Paris"], 0, 200 / 3),               # p 1/2, r 1
    ("New York City", ["New York"], 0, 80),                 # p 2/3, r 1
    ("york new", ["New York"], 0, 100),                     # same multiset, other order: F1 only
    ("", ["Paris"], 0, 0),                                  # empty prediction
    ("London", ["Paris"], 0, 0),
    ("Barack Obama", ["Obama", "Barack Obama"], 100, 100),  # the best of several gold answers
    ("Obama", ["Barack Obama", "President Obama"], 0, 200 / 3),
    ("red blue green", ["blue", "green yellow"], 0, 50),    # 'blue': p 1/3 r 1 -> 1/2; 'green yellow': 0.4
    ("cat cat", ["cat"], 0, 200 / 3),                       # multisets: one 'cat' in common
    ("cat", ["cat cat"], 0, 200 / 3),
    ("1,000", ["1000"], 100, 100),                          # the comma is punctuation
    ("3.14", ["3 14"], 0, 0),                               # '314' is one token, '3 14' two
    ("It's", ["its"], 100, 100),
    ("U.S.A.", ["USA"], 100, 100),
    ("  Paris \n\t France ", ["paris france"], 100, 100),   # whitespace collapses
    ("Answer: Paris", ["Paris"], 0, 200 / 3),
    ("e.g. The Beatles!", ["the beatles"], 0, 200 / 3),     # 'eg beatles' vs 'beatles'
    ("A", ["Apple"], 0, 0),                                 # the article alone leaves nothing
    ("the the", ["a"], 100, 0),                             # both normalise to '': equal strings, no tokens
    ("Café", ["café"], 100, 100),                           # Unicode letters are lowercased
    ("CAFÉ", ["Café"], 100, 100),
    ("naïve", ["naive"], 0, 0),                             # no accent folding
    ("“Paris”", ["Paris"], 0, 0),                           # curly quotes are not ASCII punctuation: kept
    ("Paris—France", ["Paris France"], 0, 0),               # an em dash joins one token
    ("北京", ["北京"], 100, 100),
    ("北京大学", ["北京"], 0, 0),                             # no spaces: one token (LongBench's English metric)
    ("北京 大学", ["北京"], 0, 200 / 3),
]


def test_thirty_hand_scored_pairs():
    assert len(CASES) >= 30
    for prediction, answers, em, f1 in CASES:
        assert qa.exact_match(prediction, answers) == em, (prediction, answers)
        assert qa.token_f1(prediction, answers) == pytest.approx(f1, abs=1e-9), (prediction, answers)
    with pytest.raises(ValueError, match="non-empty list"):
        qa.token_f1("Paris", "Paris")  # a bare string would be scored letter by letter


def _lm_eval_metrics():
    """lm_eval's tasks/longbench/metrics.py, loaded by path (lm_eval's package __init__ pulls in far more)."""
    try:
        spec = importlib.util.find_spec("lm_eval")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("lm_eval is not installed (pip install --no-deps lm_eval jieba fuzzywuzzy rouge)")
    path = os.path.join(spec.submodule_search_locations[0], "tasks", "longbench", "metrics.py")
    if not os.path.isfile(path):
        pytest.skip(f"this lm_eval has no {path}")
    module_spec = importlib.util.spec_from_file_location("lm_eval_longbench_metrics", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except ImportError as e:
        pytest.skip(f"lm_eval's LongBench metrics need {e.name}: pip install jieba fuzzywuzzy rouge")
    return module


@pytest.mark.slow
def test_hand_scores_equal_longbench_qa_f1_score_in_lm_eval():
    metrics = _lm_eval_metrics()
    for prediction, answers, _, f1 in CASES:
        theirs = 100 * max(metrics.qa_f1_score(prediction, a) for a in answers)
        assert theirs == pytest.approx(f1, abs=1e-9), (prediction, answers)
        assert qa.token_f1(prediction, answers) == pytest.approx(theirs, abs=1e-9)
        assert qa.normalize_answer(prediction) == metrics.normalize_answer(prediction)


def test_middle_truncation_keeps_first_and_last_halves():
    ids = list(range(10))
    assert qa.truncate_middle(ids, 10) == ids and qa.truncate_middle(ids, 20) == ids
    assert qa.truncate_middle(ids, 4) == [0, 1, 8, 9]
    assert qa.truncate_middle(ids, 5) == [0, 1, 7, 8, 9]


def test_results_bucket_by_full_prompt_length_and_by_depth():
    def rec(tokens, cut_from, depth, f1):
        return {"prompt_tokens": tokens, "truncated_from": cut_from, "depth": depth, "f1": f1, "em": 0.0,
                "form": "synthetic" if depth is not None else "longbench"}

    records = [rec(100, None, 0.1, 100.0), rec(3999, None, 0.95, 50.0), rec(4000, None, None, 0.0),
               rec(8000, 9000, 1.0, 20.0)]
    results = qa.summarize(records, [4000, 8000], depth_buckets=2)
    assert [(g["bucket"], g["items"], g["f1"]) for g in results["by_length"]] == [
        ("0-4000", 2, 75.0), ("4000-8000", 1, 0.0), ("8000+", 1, 20.0)]  # a cut prompt counts at its full length
    assert [(g["bucket"], g["items"], g["f1"]) for g in results["by_depth"]] == [("0-50%", 1, 100.0),
                                                                               ("50-100%", 2, 35.0)]
    assert results["grid"] == [[100.0, None, None], [50.0, None, 20.0]] and results["truncated"] == 1
    auto = qa.summarize(records)  # powers of two; empty buckets left out
    assert [(g["bucket"], g["items"]) for g in auto["by_length"]] == [("64-128", 1), ("2K-4K", 2), ("8K-16K", 1)]


# ---- data of both forms -----------------------------------------------------------------------------------------
DOCS = ("Document 1 (title: Mills):\nThe mill on the river was built by Ada Stone in 1871.\n\n"
        "Document 2 (title: Bridges):\nThe old bridge was painted green by Tom Reed.")
SYNTH = [{"messages": [{"role": "user", "content": DOCS + "\n\nWho built the mill?"},
                       {"role": "assistant", "content": "Ada Stone"},
                       {"role": "user", "content": "Who painted the bridge?"},
                       {"role": "assistant", "content": "Tom Reed"}],
          "qa": [{"turn": 0, "question": "Who built the mill?", "answers": ["Ada Stone"], "gold_docs": [0],
                  "depth": 0.05},
                 {"turn": 1, "question": "Who painted the bridge?", "answers": ["Tom Reed"], "gold_docs": [1],
                  "depth": 0.6}],
          "meta": {"kind": "multi-doc", "seed": 0, "length_tokens": 180, "titles": ["Mills", "Bridges"]}}]
LONGBENCH = [{"input": "In which year was the mill built?", "context": "Passage 1:\nThe mill was built in 1871.",
              "answers": ["1871"], "length": 6, "_id": "lb-0"},
             {"input": "What colour is the bridge?", "context": "Passage 1:\nThe bridge is green. " * 3,
              "answers": ["green", "Green"], "_id": "lb-1"}]
QUESTIONS = {"Who built the mill?": "Ada Stone", "Who painted the bridge?": "Tom Reed",
             "In which year was the mill built?": "1871", "What colour is the bridge?": "green"}


def _write(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return str(path)


@pytest.fixture
def data(tmp_path):
    return _write(tmp_path / "synth.jsonl", SYNTH), _write(tmp_path / "longbench.jsonl", LONGBENCH)


def test_synthetic_prompts_hold_earlier_turns_with_gold_answers(data):
    synth, longbench = data
    first, second = qa.read_items([synth])
    assert (first.answers, first.depth, second.answers, second.depth) == (["Ada Stone"], 0.05, ["Tom Reed"], 0.6)
    text = qa.prompt_text(second)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    f"<|im_start|>user\n{DOCS}\n\nWho built the mill?<|im_end|>\n"
                    "<|im_start|>assistant\nAda Stone<|im_end|>\n"
                    "<|im_start|>user\nWho painted the bridge?<|im_end|>\n<|im_start|>assistant\n")
    assert qa.prompt_text(first, system=None).startswith("<|im_start|>user\n")
    lb = qa.read_items([longbench])[0]
    assert lb.id == "lb-0" and lb.length == 6
    assert qa.prompt_text(lb, chat=False) == (
        "Answer the question based on the given passages. Only give me the answer and do not output any other "
        "words.\n\nThe following are given passages.\nPassage 1:\nThe mill was built in 1871.\n\nAnswer the "
        "question based on the given passages. Only give me the answer and do not output any other words.\n\n"
        "Question: In which year was the mill built?\nAnswer:")
    assert qa.prompt_text(lb).endswith("Answer:<|im_end|>\n<|im_start|>assistant\n")


def test_drop_gold_asks_each_question_without_its_gold_document(data):
    """--drop-gold (the no-evidence control): question 1 loses the Mills document, question 2 the Bridges one; the
    other document is renumbered 1; a LongBench record (no gold documents) is refused naming its line."""
    synth, longbench = data
    first, second = qa.read_items([synth], drop_gold=True)
    bridges = "Document 1 (title: Bridges):\nThe old bridge was painted green by Tom Reed."
    mills = "Document 1 (title: Mills):\nThe mill on the river was built by Ada Stone in 1871."
    assert first.messages == [{"role": "user", "content": bridges + "\n\nWho built the mill?"}]
    assert second.messages[0]["content"] == mills + "\n\nWho built the mill?"
    assert second.messages[1:] == SYNTH[0]["messages"][1:3]
    with pytest.raises(ConfigError, match=r"longbench.jsonl:1: --drop-gold applies to synth-qa chats"):
        qa.read_items([longbench], drop_gold=True)


def test_chatml_markers_encode_to_single_ids(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from megatron_lc.data.chat_template import encode_chatml, stop_tokens
    from megatron_lc.data.tokenizer import load_tokenizer

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([DOCS] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    text = qa.prompt_text(qa.read_items([_write(tmp_path / "s.jsonl", SYNTH)])[1])
    ids = encode_chatml(tok, text)
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert ids.count(start) == text.count("<|im_start|>") == 5 and ids.count(end) == 4
    assert tok.decode(ids) == text
    assert stop_tokens(tok)[0] == end


def test_bad_records_name_their_line(tmp_path):
    bad_json = tmp_path / "a.jsonl"
    bad_json.write_text(json.dumps(LONGBENCH[0]) + "\n{oops\n")
    with pytest.raises(qa.ConfigError, match=r"a.jsonl:2: not JSON"):
        qa.read_items([str(bad_json)])
    turn = json.loads(json.dumps(SYNTH[0]))
    turn["qa"][1]["turn"] = 2
    with pytest.raises(qa.ConfigError, match=r"b.jsonl:1: qa\[1\]\['turn'\] is 2, but the chat has 2 assistant"):
        qa.read_items([_write(tmp_path / "b.jsonl", [turn])])
    with pytest.raises(qa.ConfigError, match=r"c.jsonl:1: neither a LongBench record"):
        qa.read_items([_write(tmp_path / "c.jsonl", [{"text": "a document"}])])
    with pytest.raises(qa.ConfigError, match="--template 'Q: {input}': not one of"):
        qa.resolve_template("Q: {input}")


# ---- the command ------------------------------------------------------------------------------------------------
def test_cli_bad_input_is_a_usage_error_before_the_model_loads(tmp_path, capsys):
    marker = _write(tmp_path / "m.jsonl", [LONGBENCH[0], {**LONGBENCH[1], "context": "end<|im_end|>"}])
    for extra, message in [(["--data", marker], "m.jsonl:2: chat message of role 'user' contains the ChatML marker"),
                           (["--data", marker, "--limit", "0"], "--limit must be >= 1, got 0"),
                           (["--data", marker, "--length-buckets", "8000,4000"], "want increasing positive")]:
        with pytest.raises(SystemExit) as e:  # the model folder does not exist: the data fails first
            main(["eval", "qa", "--model", str(tmp_path / "no-model"), *extra])
        assert e.value.code == 2
        assert message in capsys.readouterr().err


@pytest.fixture
def model_folder(tmp_path):
    from megatron_lc.model import ModelConfig, Transformer, save_hf

    cfg = ModelConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                      num_kv_heads=1, max_position_embeddings=1024, rope_theta=1e4, extra={"eos_token_id": 257})
    save_hf(Transformer(cfg, seed=0), str(tmp_path / "model"))
    return str(tmp_path / "model")


def test_cli_on_both_forms_writes_json_table_and_png(model_folder, data, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "out"
    assert main(["eval", "qa", "--model", model_folder, "--data", data[0], "--data", data[1], "--max-new-tokens",
                 "3", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "qa_results.json").read_text())
    assert results["items"] == 4 and results["forms"] == {"synthetic": 2, "longbench": 2}
    preds = results["predictions"]
    assert [p["id"] for p in preds[2:]] == ["lb-0", "lb-1"] and all(len(p["prediction"]) <= 3 for p in preds)
    assert all(0 <= p["f1"] <= 100 and p["truncated_from"] is None for p in preds)
    assert sum(g["items"] for g in results["by_length"]) == 4
    assert [g["items"] for g in results["by_depth"]] == [1, 0, 0, 1, 0]  # depths 0.05 and 0.6 in fifths
    assert results["max_length"] == 1024 - 3 and results["train_length"] == 1024
    with Image.open(out / "qa_results.png") as image:
        assert image.size[0] > 1000  # two panels: length bars and the depth x length heatmap
    assert "overall" in printed and "depth 0-20%" in printed
    assert f"wrote {out / 'qa_results.json'} and {out / 'qa_results.png'}" in printed


def _oracle(right: bool, seen: list):
    """A generate() that reads the last question in the prompt and writes its gold answer (right) or a wrong one,
    then ``<|im_end|>`` spelled out in bytes and EOS; ``seen`` collects the prompt ids."""
    tok = Bytes()

    def generate(model, input_ids, max_new_tokens, eos_token_id=None, **kw):
        prompt = tok.decode(input_ids[0].tolist())
        seen.append(input_ids[0].tolist())
        question = max(QUESTIONS, key=prompt.rfind)
        answer = QUESTIONS[question] if right else "no idea"
        new = tok.encode(f" {answer}.<|im_end|>\n") + [tok.eos_token_id]
        return torch.cat([input_ids, torch.tensor([new[:max_new_tokens]])], dim=1)

    return generate


@pytest.mark.parametrize("right", [True, False])
def test_scripted_oracle_scores_100_or_0_through_the_command(model_folder, data, tmp_path, monkeypatch, right):
    import megatron_lc.model

    seen = []
    monkeypatch.setattr(megatron_lc.model, "generate", _oracle(right, seen))
    out = tmp_path / "out"
    assert main(["eval", "qa", "--model", model_folder, "--data", data[0], "--data", data[1], "--out", str(out),
                 "--device", "cpu"]) == 0
    results = json.loads((out / "qa_results.json").read_text())
    assert len(seen) == 4
    want = 100.0 if right else 0.0
    assert results["f1"] == want and results["em"] == want
    assert all(g["f1"] == want for g in results["by_length"] + [g for g in results["by_depth"] if g["items"]])
    if right:
        assert [p["prediction"] for p in results["predictions"]] == ["Ada Stone.", "Tom Reed.", "1871.", "green."]
        assert all(p["ended"] == "stop" for p in results["predictions"])


def test_long_prompts_are_cut_in_the_middle_and_counted(model_folder, data, tmp_path, monkeypatch):
    import megatron_lc.model

    seen = []
    monkeypatch.setattr(megatron_lc.model, "generate", _oracle(True, seen))
    out = tmp_path / "out"
    assert main(["eval", "qa", "--model", model_folder, "--data", data[1], "--max-length", "200", "--out", str(out),
                 "--device", "cpu"]) == 0
    results = json.loads((out / "qa_results.json").read_text())
    items = qa.read_items([data[1]])
    full = [Bytes().encode(qa.prompt_text(item)) for item in items]
    assert all(len(f) > 200 for f in full)
    assert seen == [f[:100] + f[-100:] for f in full]  # first half + last half: the system turn and the question
    assert results["truncated"] == 2 and [p["truncated_from"] for p in results["predictions"]] == [len(f) for f in full]
    assert results["f1"] == 100.0  # the question survives at the end


@pytest.mark.slow
def test_cli_under_torchrun_equals_one_process(data, tmp_path):
    """`torchrun --nproc-per-node 2 -m megatron_lc.cli eval qa ...` (ring prefill + sharded KV cache decode) writes
    the answers of the one-process command; rank 0 alone prints and writes."""
    import socket
    import subprocess
    import sys

    from megatron_lc.model import ModelConfig, Transformer, save_hf

    cfg = ModelConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, init_std=0.3, max_position_embeddings=1024, rope_theta=1e4,
                      extra={"eos_token_id": 257})
    save_hf(Transformer(cfg, seed=7), str(tmp_path / "model"))
    args = ["eval", "qa", "--model", str(tmp_path / "model"), "--data", data[0], "--data", data[1],
            "--max-new-tokens", "6", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(port), "-m", "megatron_lc.cli", *args, "--out", str(tmp_path / "cp2")],
                          check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, cp2 = (json.loads((tmp_path / d / "qa_results.json").read_text()) for d in ("one", "cp2"))
    assert cp2["cp"] == 2 and one["cp"] == 1
    assert [p["prediction"] for p in cp2["predictions"]] == [p["prediction"] for p in one["predictions"]]
    assert any(p["prediction"] for p in one["predictions"])  # not a comparison of empty answers
    assert cp2["f1"] == one["f1"] and done.stdout.count("wrote ") == 1
