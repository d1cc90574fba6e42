"""ChatML for SFT against references: the text against transformers' renderer with a Qwen2-style template written
here, the answer mask against transformers' ``return_assistant_tokens_mask`` with a ``{% generation %}`` version of
it, the token ids against transformers' fast tokenizer on the same tokenizer.json and against sentencepiece's own
encode."""
import numpy as np
import pytest

from megatron_lc.configtools import ConfigError
from megatron_lc.data.chat_data import ChatEncoder, chatml_ids
from megatron_lc.data.chat_template import render_chatml
from megatron_lc.data.tokenizer import Bytes, load_tokenizer, train_sentencepiece

pytest.importorskip("transformers")

# Qwen2-Instruct's template as the issue describes it: each message <|im_start|>{role}\n{content}<|im_end|>\n, the
# default system message first when the chat has none.
_HEAD = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
         "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}")
_TAIL = "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
QWEN2_TEMPLATE = _HEAD + "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}" + _TAIL


def _generation_template(which: str) -> str:
    """The same template with a generation block around the content and <|im_end|> of assistant turns
    (``which``: the condition choosing them, e.g. every assistant turn or only the last one)."""
    return (_HEAD + "{{ '<|im_start|>' + message['role'] + '\\n' }}"
            "{% if " + which + " %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
            "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}" + _TAIL)


GEN_TEMPLATE = _generation_template("message['role'] == 'assistant'")
GEN_LAST_TEMPLATE = _generation_template("message['role'] == 'assistant' and loop.last")


def _m(*turns):
    return [{"role": role, "content": content} for role, content in turns]


S, U, A = "system", "user", "assistant"
CHATS = [
    _m((U, "Hi"), (A, "Hello! How can I help?")),
    _m((S, "Be brief."), (U, "What is 2+2?"), (A, "4")),
    _m((U, "Name a colour."), (A, "Blue."), (U, "Another?"), (A, "Green."), (U, "One more"), (A, "Red")),
    _m((S, ""), (U, "empty system"), (A, "ok")),
    _m((U, ""), (A, "You said nothing.")),
    _m((U, "Say nothing."), (A, "")),
    _m((U, "中文问题：北京是哪个国家的首都？"), (A, "北京是中国的首都。")),
    _m((S, "Réponds en français."), (U, "Ça va ?"), (A, "Très bien, merci ! 😊")),
    _m((U, "emoji 🚀🔥 test"), (A, "🎉")),
    _m((U, "Two\nlines\n\nand a blank"), (A, "Line one\nLine two\n")),
    _m((U, "  leading spaces"), (A, "  and trailing  ")),
    _m((U, "code?"), (A, "def f(x):\n    return x * 2\n")),
    _m((S, "You are a calculator."), (U, "12*12"), (A, "144"), (U, "sqrt of that"), (A, "12")),
    _m((U, "Ελληνικά;"), (A, "Ναι, ελληνικά."), (U, "Русский?"), (A, "Да.")),
    _m((U, "tab\tseparated\tvalues"), (A, "a\tb")),
    _m((U, "<|endoftext|> is Qwen's EOS"), (A, "Yes, <|endoftext|> ends a document.")),
    _m((S, "Long system prompt " * 5), (U, "q"), (A, "a")),
    _m((U, "user\nassistant\n"), (A, "assistant\nuser")),
    _m((U, "numbers 1234567890"), (A, "0987654321"), (U, ""), (A, "")),
    _m((S, "日本語で答えて。"), (U, "こんにちは"), (A, "こんにちは！"), (U, "ありがとう"), (A, "どういたしまして")),
]


def _corpus():
    return [render_chatml(chat, add_generation_prompt=False) for chat in CHATS] * 3


def _hf_tokenizer(kind: str, folder):
    """A tiny BPE tokenizer.json with the three ChatML specials, saved in ``folder`` and loaded by transformers:
    ``bytelevel`` (Qwen2-like byte-level BPE) or ``chars`` (no pre-tokenizer: merges cross the newline after the
    role, so tokens straddle the header and the answer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.decoder = decoders.Fuse()
        trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", *specials])
    # frequent replies make merges such as "assistant\nYes" that reach into an answer (for "chars")
    tok.train_from_iterator(_corpus() + ["assistant\nYes", "assistant\nNa", "assistant\n12"] * 50, trainer)
    path = folder / "tokenizer.json"
    tok.save(str(path))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    return hf, path


def test_chatml_text_is_transformers_qwen2_template():
    from transformers.utils.chat_template_utils import render_jinja_template

    for template in (QWEN2_TEMPLATE, GEN_TEMPLATE):
        for gen in (False, True):
            want, _ = render_jinja_template(CHATS, chat_template=template, add_generation_prompt=gen)
            for chat, text in zip(CHATS, want):
                assert render_chatml(chat, add_generation_prompt=gen) == text, chat


@pytest.mark.parametrize("kind", ["bytelevel", "chars"])
def test_ids_and_answer_mask_equal_transformers(kind, tmp_path):
    hf, path = _hf_tokenizer(kind, tmp_path)
    ours = load_tokenizer(str(path))
    straddles = 0
    for last_only, template in ((False, GEN_TEMPLATE), (True, GEN_LAST_TEMPLATE)):
        encoder = ChatEncoder(ours, last_turn_only=last_only)
        for chat, (ids, mask) in zip(CHATS, encoder.encode_many(CHATS)):
            want = hf.apply_chat_template(chat, chat_template=template, tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)
            assert ids.tolist() == list(want["input_ids"]), chat
            assert mask.astype(int).tolist() == list(want["assistant_masks"]), (chat, last_only)
            assert ours.decode(ids) == render_chatml(chat, add_generation_prompt=False)
            prompt = hf.apply_chat_template(chat[:-1], chat_template=template, tokenize=True, return_dict=True,
                                            add_generation_prompt=True)
            assert encoder.prompt_ids(chat[:-1]).tolist() == list(prompt["input_ids"]), chat
            text = render_chatml(chat, add_generation_prompt=False)
            heads = [i + len("<|im_start|>assistant\n") for i in range(len(text))
                     if text.startswith("<|im_start|>assistant\n", i)]
            offsets = hf(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            straddles += sum(start < head < end for start, end in offsets for head in heads)
    if kind == "chars":  # the case where finding the answer's first token matters is exercised
        assert straddles > 0


def test_ids_equal_sentencepiece_encode_with_single_id_markers(tmp_path):
    import sentencepiece as spm

    path = train_sentencepiece(_corpus(), str(tmp_path / "sp"), 400, seed=0, num_threads=1)
    sp = spm.SentencePieceProcessor(model_file=path)
    ours = load_tokenizer(path)
    im_start, im_end = chatml_ids(ours)
    assert (im_start, im_end) == (sp.piece_to_id("<|im_start|>"), sp.piece_to_id("<|im_end|>"))
    for chat, (ids, mask) in zip(CHATS, ChatEncoder(ours).encode_many(CHATS)):
        text = render_chatml(chat, add_generation_prompt=False)
        assert ids.tolist() == sp.encode(text), chat
        prompt = render_chatml(chat[:-1], add_generation_prompt=True)  # what eval qa and chat encode
        assert ChatEncoder(ours).prompt_ids(chat[:-1]).tolist() == sp.encode(prompt), chat
        assert (ids == im_start).sum() == (ids == im_end).sum() == text.count("<|im_start|>")
        # The mask against sentencepiece's own offsets (bytes of the text): a token is an answer token when it
        # overlaps an assistant turn's content or its <|im_end|> (the span transformers' generation block marks).
        raw, head, end = text.encode(), b"<|im_start|>assistant\n", b"<|im_end|>"
        starts = [i + len(head) for i in range(len(raw)) if raw.startswith(head, i)]
        spans = [(start, raw.index(end, start) + len(end)) for start in starts]
        pieces = sp.encode(text, out_type="proto").pieces
        want = [any(p.begin < stop and p.end > start for start, stop in spans) for p in pieces]
        assert mask.tolist() == want, chat


def test_tokenizer_without_chatml_ids_is_refused_naming_it():
    with pytest.raises(ConfigError, match="tokenizer bytes has no <\\|im_start\\|> or <\\|im_end\\|>.*train-tokenizer"):
        ChatEncoder(Bytes())


def test_answer_tokens_of_a_multi_turn_chat(tmp_path):
    """On a real multi-turn chat the answer tokens decode to exactly the assistant replies, each with its
    <|im_end|>; nothing of the system or user turns, nor the assistant headers, carries loss."""
    path = train_sentencepiece(_corpus(), str(tmp_path / "sp"), 400, seed=0, num_threads=1)
    tok = load_tokenizer(path)
    chat = CHATS[12]
    ids, mask = ChatEncoder(tok).encode(chat)
    answers = [m["content"] + "<|im_end|>" for m in chat if m["role"] == "assistant"]
    runs = np.split(ids, np.flatnonzero(np.diff(mask.astype(int))) + 1)
    flags = [bool(m[0]) for m in np.split(mask, np.flatnonzero(np.diff(mask.astype(int))) + 1)]
    assert [tok.decode(r) for r, f in zip(runs, flags) if f] == answers
    ids_last, mask_last = ChatEncoder(tok, last_turn_only=True).encode(chat)
    assert np.array_equal(ids_last, ids)
    assert tok.decode(ids[mask_last]) == answers[-1]
