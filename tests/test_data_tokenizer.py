"""megatron_lc.data.tokenizer: sentencepiece training (BPE, unigram), the one tokenizer interface over
sentencepiece / HF tokenizer.json / bytes, special tokens, and load_tokenizer dispatch."""
import json
import os
from pathlib import Path

import pytest
import torch

from megatron_lc.configtools import ConfigError
from megatron_lc.data.stdlib_text import stdlib_docstrings
from megatron_lc.data.tokenizer import (
    BYTE_BOS_ID,
    BYTE_EOS_ID,
    BYTE_PAD_ID,
    BYTE_VOCAB_SIZE,
    CHATML_SPECIALS,
    SP_BOS_ID,
    SP_EOS_ID,
    SP_PAD_ID,
    SP_UNK_ID,
    Bytes,
    HFTokenizerFile,
    SentencePieceTokenizer,
    Tokenizer,
    _sentences,
    load_tokenizer,
    train_sentencepiece,
)

VOCAB = 800
# Held out from training; non-ASCII (accents, emoji, CJK, a tab, CRLF) must come back exactly via byte fallback.
HELD_OUT = [
    "def area(r):\n    \"\"\"Return the area.\"\"\"\n    return 3.14159 * r ** 2\n",
    "Crème brûlée costs 12€ — naïve café 😀🚀 中文字符 日本語テキスト\tend\r\n",
    "  leading and trailing spaces   \n\n\nthree newlines above",
]
CHAT = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|endoftext|>"


@pytest.fixture(scope="module")
def corpus():
    docs = stdlib_docstrings(400_000)  # stdlib docstrings, ~400 KB: trains in about a second
    assert len(docs) > 100
    return docs


@pytest.fixture(scope="module")
def sp_models(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("sp")
    return {kind: train_sentencepiece(corpus, str(out / kind), VOCAB, model_type=kind, seed=0, num_threads=1)
            for kind in ("bpe", "unigram")}


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def sp(request, sp_models):
    return SentencePieceTokenizer(sp_models[request.param])


# ---- sentencepiece training -----------------------------------------------------------------------------------------
def test_vocab_layout_and_ids(sp):
    assert isinstance(sp, Tokenizer)
    assert sp.vocab_size == VOCAB
    assert (sp.bos_token_id, sp.eos_token_id, sp.pad_token_id) == (SP_BOS_ID, SP_EOS_ID, SP_PAD_ID) == (1, 2, 3)
    want = {"<unk>": SP_UNK_ID, "<s>": 1, "</s>": 2, "<pad>": 3, "<|endoftext|>": 4, "<|im_start|>": 5,
            "<|im_end|>": 6}
    assert sp.special_tokens == want
    assert sp.token_to_id("<0x00>") == 7 and sp.token_to_id("<0xFF>") == 7 + 255  # byte pieces follow
    assert sp.token_to_id("no-such-piece-xyz") is None
    assert sp.token_to_id("<unk>") == 0


def test_round_trip_exact_on_held_out_text(sp):
    for text in HELD_OUT + [CHAT, ""]:
        ids = sp.encode(text)
        assert all(isinstance(i, int) and 0 <= i < sp.vocab_size for i in ids)
        assert sp.decode(ids) == text
    assert SP_UNK_ID not in sp.encode(HELD_OUT[1])  # byte fallback: nothing unknown
    # it learned words: held-out English prose (58 bytes) takes well under one token per 4 bytes (14 at training)
    prose = "Return the value of the given object in the list of files."
    assert len(sp.encode(prose)) <= len(prose) // 3


def test_newlines_are_learned_pieces_not_bytes(sp):
    """Documents are fed as runs of whole lines, so '\\n' is seen inside sentences and gets a piece."""
    assert sp.token_to_id("\n") is not None
    assert sp.token_to_id("<0x0A>") not in sp.encode("a\nb\n")


def test_digits_split(sp):
    ids = sp.encode("12345")
    assert [sp.decode([i]) for i in ids] == ["1", "2", "3", "4", "5"]
    # without split_digits this corpus merges " 2" and "00"
    assert [sp.decode([i]) for i in sp.encode("year 2024 1000")][-9:] == list("2024") + [" "] + list("1000")


def test_chatml_specials_encode_to_single_ids(sp):
    ids = sp.encode(CHAT)
    start, end, eot = (sp.special_tokens[t] for t in CHATML_SPECIALS[1:] + CHATML_SPECIALS[:1])
    assert ids[0] == start and ids.count(start) == 2 and ids.count(end) == 2 and ids[-1] == eot
    assert sp.encode("x<|im_end|>y") == sp.encode("x") + [end] + sp.encode("y")  # matched inside words too
    # skip_special_tokens drops them; by default they are kept (round trip)
    assert sp.decode(ids, skip_special_tokens=True) == "user\nWhat is 2+2?\nassistant\n4\n"
    # control tokens are never produced from text
    assert sp.encode("</s><s><pad>").count(SP_EOS_ID) == 0


def test_bos_eos_on_request_and_batch(sp):
    text = HELD_OUT[0]
    plain = sp.encode(text)
    assert sp.encode(text, add_bos=True, add_eos=True) == [SP_BOS_ID] + plain + [SP_EOS_ID]
    assert sp.encode(text, add_eos=True) == plain + [SP_EOS_ID]
    assert sp.decode(sp.encode(text, add_bos=True, add_eos=True)) == text  # control tokens have no text
    texts = HELD_OUT + [CHAT, ""]
    assert sp.encode_batch(texts) == [sp.encode(t) for t in texts]
    assert sp.encode_batch(texts, add_bos=True, add_eos=True, num_threads=2) == [
        sp.encode(t, add_bos=True, add_eos=True) for t in texts]
    with pytest.raises(ConfigError, match="str"):
        sp.encode(b"bytes")


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_training_is_deterministic(corpus, sp_models, tmp_path, kind):
    again = train_sentencepiece(corpus, str(tmp_path / kind), VOCAB, model_type=kind, seed=0, num_threads=1)
    with open(again, "rb") as a, open(sp_models[kind], "rb") as b:
        assert a.read() == b.read()


def test_sampling_uses_the_seed(corpus, tmp_path):
    """input_sentence_size draws a seeded sample: same seed -> same model, another seed -> another sample."""
    def train(seed, name):
        path = train_sentencepiece(corpus, str(tmp_path / name), 500, input_sentence_size=300, seed=seed,
                                   num_threads=1)
        with open(path, "rb") as f:
            return f.read()
    a, b, c = train(1, "a"), train(1, "b"), train(2, "c")
    assert a == b and a != c


def test_long_lines_are_cut_not_dropped():
    line = "é" * 100 + "x" * 50  # 250 bytes on one line
    doc = "short line\n" + line + "\nlast"
    chunks = list(_sentences([doc, ""], max_bytes=64))
    assert "".join(chunks) == doc
    assert all(len(c.encode()) <= 64 for c in chunks)
    with pytest.raises(ConfigError, match="#1 is bytes"):
        list(_sentences(["ok", b"no"], 64))


def test_a_long_line_is_learned_from(tmp_path):
    """One 20 KB line (above max_sentence_length) still trains: sentencepiece alone would skip it."""
    text = ("zebra quokka " * 1600).strip()
    path = train_sentencepiece([text], str(tmp_path / "long"), 300, special_tokens=(), max_sentence_length=1024,
                               num_threads=1)
    tok = SentencePieceTokenizer(path)
    assert len(tok.encode("zebra quokka zebra")) <= 5  # whole words were learned from the long line


def test_training_errors(corpus, tmp_path):
    out = str(tmp_path / "m")
    with pytest.raises(ConfigError, match="263 are reserved"):
        train_sentencepiece(corpus, out, 263)
    with pytest.raises(ConfigError, match="model_type"):
        train_sentencepiece(corpus, out, 600, model_type="wordpiece")
    with pytest.raises(ConfigError, match="no text"):
        train_sentencepiece(["", ""], out, 600)
    with pytest.raises(ConfigError, match="duplicates"):
        train_sentencepiece(corpus, out, 600, special_tokens=("<a>", "<a>"))
    with pytest.raises(ConfigError, match="control piece"):
        train_sentencepiece(corpus, out, 600, special_tokens=("</s>",))
    with pytest.raises(ConfigError, match="#1 is int"):
        train_sentencepiece(["some text\n" * 50, 7], out, 600, num_threads=1)
    # above the reserved count but below the corpus's characters: sentencepiece's own error, as ConfigError
    with pytest.raises(ConfigError, match="vocab_size=270"):
        train_sentencepiece(corpus, out, 270, num_threads=1)
    assert not os.path.exists(out + ".model")


# ---- HF tokenizer.json (Qwen2-like byte-level BPE) ----------------------------------------------------------------
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.fixture(scope="module")
def hf_folder(corpus, tmp_path_factory):
    """A tiny Qwen2-shaped tokenizer.json: NFC, Qwen2's split regex + byte-level, specials appended after the
    learned vocabulary (as Qwen2's 151643..151645)."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTok

    tok = HFTok(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=597, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens(list(CHATML_SPECIALS))
    folder = tmp_path_factory.mktemp("qwen2ish")
    tok.save(str(folder / "tokenizer.json"))
    return folder


def _write(path, data):
    with open(path, "w") as f:
        json.dump(data, f)


def test_hf_tokenizer_interface(hf_folder):
    tok = HFTokenizerFile(str(hf_folder / "tokenizer.json"))
    assert tok.vocab_size == 600
    assert tok.special_tokens == {"<|endoftext|>": 597, "<|im_start|>": 598, "<|im_end|>": 599}
    # no config files: EOS falls back to <|endoftext|> (Qwen2 base), no BOS, no PAD
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (None, 597, None)
    for text in HELD_OUT + [CHAT]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode(CHAT)
    assert ids[0] == 598 and ids.count(598) == 2 and ids.count(599) == 2 and ids[-1] == 597
    assert tok.decode(ids, skip_special_tokens=True) == "user\nWhat is 2+2?\nassistant\n4\n"
    assert [tok.decode([i]) for i in tok.encode("12345")] == list("12345")
    assert tok.encode("hi", add_eos=True) == tok.encode("hi") + [597]
    with pytest.raises(ConfigError, match="no BOS"):
        tok.encode("hi", add_bos=True)
    texts = HELD_OUT + [CHAT, ""]
    assert tok.encode_batch(texts, add_eos=True) == [tok.encode(t, add_eos=True) for t in texts]
    assert tok.token_to_id("<|im_end|>") == 599 and tok.token_to_id("no-such-token") is None


def test_hf_specials_from_config_files(hf_folder, tmp_path):
    folder = tmp_path / "chat"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((hf_folder / "tokenizer.json").read_bytes())
    # Qwen2-Instruct: tokenizer_config.json says eos <|im_end|>, bos null, pad <|endoftext|>; config.json's
    # bos_token_id is ignored because tokenizer_config.json names bos (as null).
    _write(folder / "tokenizer_config.json", {"bos_token": None, "eos_token": "<|im_end|>",
                                             "pad_token": {"content": "<|endoftext|>"}})
    _write(folder / "config.json", {"bos_token_id": 597, "eos_token_id": [599, 597]})
    tok = load_tokenizer(str(folder))
    assert isinstance(tok, HFTokenizerFile)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (None, 599, 597)
    assert load_tokenizer(str(folder), eos_token_id=597).eos_token_id == 597  # explicit wins
    os.remove(folder / "tokenizer_config.json")  # config.json alone: first of the eos list
    tok = HFTokenizerFile(str(folder))
    assert (tok.bos_token_id, tok.eos_token_id) == (597, 599)
    _write(folder / "tokenizer_config.json", {"eos_token": "<|nope|>"})
    with pytest.raises(ConfigError, match="not in the vocabulary"):
        HFTokenizerFile(str(folder))


# ---- bytes and dispatch -------------------------------------------------------------------------------------------
def test_bytes_tokenizer():
    tok = Bytes()
    text = HELD_OUT[1]
    assert tok.encode(text) == list(text.encode())
    assert tok.encode("a", add_bos=True, add_eos=True) == [256, 97, 257]
    assert tok.decode([256, *tok.encode(text), 257, 258]) == text
    assert tok.decode(torch.tensor(tok.encode(text))) == text
    assert tok.decode([0xC3]) == "\ufffd"  # a cut multi-byte character is replaced, not an error
    # The demo preset's vocabulary and the specials in the config.json of models saved by `megatron-lc demo`.
    assert (BYTE_BOS_ID, BYTE_EOS_ID, BYTE_PAD_ID, BYTE_VOCAB_SIZE) == (256, 257, 258, 260)
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (260, 256, 257, 258)
    assert Bytes(eos_token_id=10).eos_token_id == 10 and tok.name == "bytes"
    assert tok.encode_batch(["ab", ""]) == [[97, 98], []]
    assert tok.token_to_id("a") == 97 and tok.token_to_id("</s>") == 257 and tok.token_to_id("é") is None


def test_load_tokenizer_dispatch_and_errors(sp_models, hf_folder, tmp_path):
    assert isinstance(load_tokenizer(None), Bytes) and isinstance(load_tokenizer("bytes"), Bytes)
    assert isinstance(load_tokenizer(sp_models["bpe"]), SentencePieceTokenizer)
    assert load_tokenizer(sp_models["bpe"], eos_token_id=6).eos_token_id == 6  # e.g. <|im_end|> for chat
    assert isinstance(load_tokenizer(str(hf_folder / "tokenizer.json")), HFTokenizerFile)
    assert isinstance(load_tokenizer(str(hf_folder)), HFTokenizerFile)
    llama_style = tmp_path / "llama_style"
    llama_style.mkdir()
    (llama_style / "tokenizer.model").write_bytes(Path(sp_models["unigram"]).read_bytes())
    assert isinstance(load_tokenizer(str(llama_style)), SentencePieceTokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty.*neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="missing.txt: no such file.*sentencepiece '.model'"):
        load_tokenizer(str(tmp_path / "missing.txt"))
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ConfigError, match="vocab.txt: unknown file type"):
        load_tokenizer(str(tmp_path / "vocab.txt"))
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="not a sentencepiece model"):
        load_tokenizer(str(tmp_path / "bad.model"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="not an HF tokenizer.json"):
        load_tokenizer(str(tmp_path / "bad.json"))
