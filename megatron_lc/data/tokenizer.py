"""Tokenizers behind one interface: sentencepiece ``.model``, HF ``tokenizer.json`` and UTF-8 bytes.

Every tokenizer here is a :class:`Tokenizer`: ``encode(text, add_bos=False, add_eos=False) -> list[int]``,
``encode_batch``, ``decode(ids, skip_special_tokens=False) -> str``, ``vocab_size``, ``bos/eos/pad_token_id``
(``None`` where the tokenizer has none), ``token_to_id``, ``special_tokens`` and ``name``. :func:`load_tokenizer`
picks the implementation from a path; :func:`train_sentencepiece` trains a new sentencepiece model.

Special tokens, the same way for every backend:
- ``encode`` adds no BOS/EOS unless asked (``add_bos``/``add_eos``); a tokenizer without that token raises
  ConfigError when asked for it.
- Special tokens written *in the text* (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``) are parsed: each
  becomes its single id. sentencepiece models trained here hold them as ``user_defined_symbols``; HF tokenizers
  match their added tokens. So ChatML text encodes with its markers as one id each (needed by SFT). Our
  sentencepiece models' BOS ``<s>``, EOS ``</s>``, PAD ``<pad>`` are control tokens: text never produces them.
- ``decode`` keeps every token by default, so ``decode(encode(text)) == text`` also for ChatML text; pass
  ``skip_special_tokens=True`` to drop the ids in ``special_tokens`` (e.g. for generated answers). Control tokens
  that have no text (sentencepiece ``<s>``/``</s>``/``<pad>``, the byte tokenizer's 256..258) decode to "" either way.
"""
from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Iterable, Iterator, Sequence

from ..configtools import ConfigError

CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""Qwen2's special tokens: ``<|endoftext|>`` (Qwen2 base EOS), ``<|im_start|>role\\n ... <|im_end|>`` (ChatML turns)."""

# Ids of the control pieces in sentencepiece models trained here (fixed so configs can rely on them).
SP_UNK_ID, SP_BOS_ID, SP_EOS_ID, SP_PAD_ID = 0, 1, 2, 3
_SP_CONTROL_PIECES = ("<unk>", "<s>", "</s>", "<pad>")

ACCEPTED_FORMS = ("'bytes' (or nothing) for the UTF-8 byte tokenizer, a sentencepiece '.model' file, an HF "
                  "'tokenizer.json', or a folder holding tokenizer.json or tokenizer.model")


def _ids_list(ids: Iterable[int]) -> list[int]:
    """Ints, a 1-D tensor or a 1-D array -> list of Python ints."""
    return [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]


class Tokenizer:
    """The interface every tokenizer implements; subclasses provide ``_encode``, ``_encode_many`` and ``decode``.

    Attributes: ``name`` (str), ``vocab_size`` (number of ids: max id + 1, what an embedding needs),
    ``bos_token_id``/``eos_token_id``/``pad_token_id`` (int or None), ``special_tokens`` (dict token -> id).
    """

    name: str = "tokenizer"
    vocab_size: int
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    """Id that ends a document (packing) or a generated answer; None: the tokenizer has none."""
    pad_token_id: int | None = None
    special_tokens: dict[str, int]
    """Every special token (BOS/EOS/PAD/UNK, ChatML markers, ...) -> its id."""

    # ---- subclasses ----
    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _encode_many(self, texts: list[str], num_threads: int | None) -> list[list[int]]:
        return [self._encode(t) for t in texts]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """ids (ints, or a 1-D int tensor/array) -> str. ``skip_special_tokens`` drops the ids of
        ``special_tokens``; by default every token's text is kept."""
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        """The id of one token string (a vocabulary entry, e.g. ``"<|im_start|>"``), or None if absent."""
        raise NotImplementedError

    # ---- shared ----
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """str -> list of int ids; special tokens in the text become their single ids; BOS/EOS only if asked."""
        return self._frame(self._encode(self._check_text(text)), add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False,
                     num_threads: int | None = None) -> list[list[int]]:
        """``[encode(t, add_bos, add_eos) for t in texts]``, computed by the library's own batch encoder.
        ``num_threads`` None: the library's default."""
        texts = [self._check_text(t) for t in texts]
        return [self._frame(ids, add_bos, add_eos) for ids in self._encode_many(texts, num_threads)]

    def _check_text(self, text) -> str:
        if not isinstance(text, str):
            raise ConfigError(f"{self.name}: encode takes str, got {type(text).__name__}; decode bytes to str first")
        return text

    def _frame(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            if self.bos_token_id is None:
                raise ConfigError(f"{self.name} has no BOS token; call encode with add_bos=False (Qwen2-style "
                                  f"tokenizers use none) or give bos_token_id")
            ids = [self.bos_token_id] + ids
        if add_eos:
            if self.eos_token_id is None:
                raise ConfigError(f"{self.name} has no EOS token; give eos_token_id (e.g. the model's "
                                  f"config.json eos_token_id)")
            ids = ids + [self.eos_token_id]
        return ids

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size}, bos={self.bos_token_id}, "
                f"eos={self.eos_token_id}, pad={self.pad_token_id})")


# ---- UTF-8 bytes -------------------------------------------------------------------------------------------------
BYTE_BOS_ID, BYTE_EOS_ID, BYTE_PAD_ID = 256, 257, 258
"""The byte tokenizer's specials; the demo preset and models saved by ``megatron-lc demo`` rely on these ids."""
BYTE_VOCAB_SIZE = 260
"""Embedding rows for byte ids: 256 bytes, the three specials and id 259 (unused)."""


class Bytes(Tokenizer):
    """UTF-8 bytes as ids 0..255 with the specials BOS 256, EOS 257 (also the document separator when packing),
    PAD 258; ``vocab_size`` 260. Needs no file (``load_tokenizer("bytes")``, the demo's tokenizer).
    The specials have no text: decode always drops them (and any id outside 0..255)."""

    def __init__(self, eos_token_id: int | None = None):
        self.name = "bytes"
        self.vocab_size = BYTE_VOCAB_SIZE
        self.bos_token_id = BYTE_BOS_ID
        self.eos_token_id = BYTE_EOS_ID if eos_token_id is None else int(eos_token_id)
        self.pad_token_id = BYTE_PAD_ID
        self.special_tokens = {"<s>": BYTE_BOS_ID, "</s>": BYTE_EOS_ID, "<pad>": BYTE_PAD_ID}

    def _encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """ids -> str; invalid UTF-8 becomes U+FFFD."""
        return bytes(i for i in _ids_list(ids) if 0 <= i < 256).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        """A special's name, or a one-byte character (ASCII) -> its id."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        raw = token.encode("utf-8")
        return raw[0] if len(raw) == 1 else None


# ---- sentencepiece ------------------------------------------------------------------------------------------------
class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model``. BOS/EOS/PAD come from the model (``-1`` there -> None) unless given here.

    ``special_tokens`` holds the control pieces (``<s>``, ``</s>``, ``<pad>``), ``<unk>`` and every
    ``user_defined_symbol`` (e.g. the ChatML markers); user-defined symbols in text encode to their single id.
    """

    def __init__(self, path: str, bos_token_id: int | None = None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb

        if not os.path.isfile(path):
            raise ConfigError(f"sentencepiece model {path}: no such file")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"{path} is not a sentencepiece model ({e}); accepted: {ACCEPTED_FORMS}") from e
        self.name = os.path.basename(path)
        self.path = path
        self.vocab_size = self._sp.get_piece_size()

        def own(given, model_id):
            return int(given) if given is not None else (model_id if model_id >= 0 else None)

        self.bos_token_id = own(bos_token_id, self._sp.bos_id())
        self.eos_token_id = own(eos_token_id, self._sp.eos_id())
        self.pad_token_id = own(pad_token_id, self._sp.pad_id())
        self._unk_id = self._sp.unk_id()
        proto = pb.ModelProto()
        proto.ParseFromString(self._sp.serialized_model_proto())
        kinds = {pb.ModelProto.SentencePiece.CONTROL, pb.ModelProto.SentencePiece.USER_DEFINED,
                 pb.ModelProto.SentencePiece.UNKNOWN}
        self.special_tokens = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in kinds}
        self._special_ids = frozenset(self.special_tokens.values())

    def _encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def _encode_many(self, texts: list[str], num_threads: int | None) -> list[list[int]]:
        return self._sp.encode(texts, num_threads=-1 if num_threads is None else int(num_threads))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """ids -> str; ``<unk>`` decodes to `` ⁇ `` unless skipped; an id outside the vocabulary raises
        IndexError."""
        ids = _ids_list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self._sp.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return None if i == self._unk_id and token != self._sp.id_to_piece(i) else i


def _sentences(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Documents -> sentencepiece "sentences": runs of whole lines (newlines kept inside, so sentencepiece learns
    ``\\n`` pieces) of at most ``max_bytes`` UTF-8 bytes; a longer line is cut at character boundaries. Nothing is
    dropped: every character of every document is in exactly one sentence."""
    for n, doc in enumerate(texts):
        if not isinstance(doc, str):
            raise ConfigError(f"train_sentencepiece: text #{n} is {type(doc).__name__}, not str")
        buf: list[str] = []
        size = 0
        for line in doc.splitlines(keepends=True):
            raw = line.encode("utf-8")
            if size + len(raw) > max_bytes and buf:
                yield "".join(buf)
                buf, size = [], 0
            if len(raw) <= max_bytes:
                buf.append(line)
                size += len(raw)
                continue
            start = 0
            while start < len(raw):
                end = min(start + max_bytes, len(raw))
                while end < len(raw) and (raw[end] & 0xC0) == 0x80:  # don't cut inside a UTF-8 character
                    end -= 1
                yield raw[start:end].decode("utf-8")
                start = end
        if buf:
            yield "".join(buf)


def _reservoir(items: Iterable[str], k: int, seed: int) -> list[str]:
    """A uniform sample of ``k`` items (Algorithm R, ``random.Random(seed)``); all of them if there are fewer."""
    rng = random.Random(seed)
    sample: list[str] = []
    for n, item in enumerate(items):
        if n < k:
            sample.append(item)
        else:
            j = rng.randrange(n + 1)
            if j < k:
                sample[j] = item
    return sample


def train_sentencepiece(texts: Iterable[str], out_prefix: str, vocab_size: int, model_type: str = "bpe",
                        byte_fallback: bool = True, split_digits: bool = True,
                        special_tokens: Sequence[str] = CHATML_SPECIALS, character_coverage: float = 0.9995,
                        max_sentence_length: int = 8192, input_sentence_size: int = 0, seed: int = 0,
                        num_threads: int | None = None, verbose: bool = False) -> str:
    """Train a sentencepiece model on ``texts`` (documents, str) and write ``{out_prefix}.model``; return its path.

    Vocabulary layout (ids): 0 ``<unk>``, 1 ``<s>`` (BOS), 2 ``</s>`` (EOS: ends each document when packing),
    3 ``<pad>``; then ``special_tokens`` in order (4, 5, ... : ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``
    by default) as user-defined symbols, which text containing them encodes to as single ids; then with
    ``byte_fallback`` the 256 byte pieces ``<0x00>..<0xFF>`` (any character outside the vocabulary encodes to its
    UTF-8 bytes, so nothing becomes ``<unk>``); then the learned pieces.

    Text is kept as is (identity normalization, no whitespace collapsing, no dummy prefix), so
    ``decode(encode(t)) == t`` exactly. ``split_digits``: every digit is its own piece.

    Sentences: sentencepiece trains on "sentences" of at most ``max_sentence_length`` UTF-8 bytes and silently
    skips longer ones; here each document is cut into runs of whole lines up to that size (a longer single line
    is cut at character boundaries), so no text is skipped. ``input_sentence_size`` > 0 trains on a uniform
    sample of that many sentences (drawn here with ``seed``; sentencepiece holds the sample in memory, about
    ``input_sentence_size * max_sentence_length`` bytes at most); 0 uses all of ``texts``.

    Deterministic: the same texts, arguments, ``seed`` and ``num_threads`` give the same model (the unigram
    trainer's result depends on the thread count; None uses ``os.cpu_count()``). sentencepiece's random seed is
    process-global; this sets it to ``seed``.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ConfigError(f"model_type={model_type!r}: use 'bpe' or 'unigram'")
    specials = list(special_tokens)
    for tok in specials:
        if not isinstance(tok, str) or not tok:
            raise ConfigError(f"special token {tok!r} must be a non-empty str")
        if tok in _SP_CONTROL_PIECES:
            raise ConfigError(f"special token {tok!r} is already a control piece ({', '.join(_SP_CONTROL_PIECES)} "
                              f"have ids 0..3); leave it out of special_tokens")
    if len(set(specials)) != len(specials):
        raise ConfigError(f"special_tokens {specials} has duplicates; list each once")
    reserved = len(_SP_CONTROL_PIECES) + len(specials) + (256 if byte_fallback else 0)
    if not isinstance(vocab_size, int) or vocab_size <= reserved:
        raise ConfigError(f"vocab_size={vocab_size} leaves no room for learned pieces: {len(_SP_CONTROL_PIECES)} "
                          f"control + {len(specials)} special + {256 if byte_fallback else 0} byte pieces = "
                          f"{reserved} are reserved; use a vocab_size above {reserved} plus the corpus's characters "
                          f"(a few hundred for English, thousands for CJK)")
    if not 0.0 < character_coverage <= 1.0:
        raise ConfigError(f"character_coverage={character_coverage}: use a value in (0, 1], e.g. 0.9995 (or 1.0 "
                          f"for small alphabets)")
    if max_sentence_length < 64:
        raise ConfigError(f"max_sentence_length={max_sentence_length} bytes is too short; use >= 64 (default 8192)")
    if input_sentence_size < 0:
        raise ConfigError(f"input_sentence_size={input_sentence_size}: use 0 (all text) or a positive sample size")

    sentences = _sentences(texts, max_sentence_length)
    if input_sentence_size:
        sentences = iter(_reservoir(sentences, input_sentence_size, seed))
    try:
        first = next(sentences)
    except StopIteration:
        raise ConfigError("train_sentencepiece got no text: pass at least one non-empty document") from None

    bad: list[ConfigError] = []

    def chained():
        # sentencepiece turns an exception raised here into a RuntimeError: keep ours and raise it after.
        yield first
        try:
            yield from sentences
        except ConfigError as e:
            bad.append(e)

    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=chained(), model_writer=model, model_type=model_type, vocab_size=vocab_size,
            byte_fallback=byte_fallback, split_digits=split_digits, user_defined_symbols=specials,
            unk_id=SP_UNK_ID, bos_id=SP_BOS_ID, eos_id=SP_EOS_ID, pad_id=SP_PAD_ID,
            unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, character_coverage=character_coverage,
            max_sentence_length=max_sentence_length, input_sentence_size=0,
            num_threads=num_threads or os.cpu_count() or 1, minloglevel=0 if verbose else 2)
    except RuntimeError as e:
        if bad:
            raise bad[0] from None
        raise ConfigError(f"sentencepiece training failed for vocab_size={vocab_size}, model_type={model_type}: "
                          f"{str(e).rstrip('.')}. "
                          f"A too-small vocab_size (below the corpus's characters) or a too-large one for the text "
                          f"(unigram) are the usual causes") from e
    if bad:
        raise bad[0]
    path = out_prefix + ".model"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, path)  # a reader never sees a half-written model
    return path


# ---- HF tokenizer.json --------------------------------------------------------------------------------------------
_EOS_GUESSES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it as JSON ({e})") from e
    return data if isinstance(data, dict) else {}


class HFTokenizerFile(Tokenizer):
    """An HF ``tokenizer.json`` (e.g. Qwen2's byte-level BPE), read with the ``tokenizers`` library.

    ``path_or_folder``: the file or its folder. BOS/EOS/PAD: the arguments if given, else ``tokenizer_config.json``
    beside the file (``bos_token``/``eos_token``/``pad_token``; a key present with null means none: Qwen2 has no
    BOS), else ``config.json`` (``*_token_id``; a list -> its first), else for EOS the first special token among
    ``<|endoftext|>``, ``</s>``, ``<|end_of_text|>``, ``<eos>``. Qwen2 base: EOS ``<|endoftext|>``; Qwen2 chat
    (``-Instruct``): EOS ``<|im_end|>``.
    ``special_tokens``: the added tokens marked special. Encoding never applies the file's post-processor
    template (BOS/EOS come only from ``add_bos``/``add_eos``). ``encode_batch``'s ``num_threads`` is not used:
    the library's thread pool is sized once per process by the ``RAYON_NUM_THREADS`` environment variable.
    """

    def __init__(self, path_or_folder: str, eos_token_id: int | None = None, bos_token_id: int | None = None,
                 pad_token_id: int | None = None):
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError as e:  # pragma: no cover - transformers depends on tokenizers
            raise ConfigError("reading tokenizer.json needs the 'tokenizers' package (pip install tokenizers)") from e
        path = os.path.join(path_or_folder, "tokenizer.json") if os.path.isdir(path_or_folder) else path_or_folder
        if not os.path.isfile(path):
            raise ConfigError(f"HF tokenizer {path}: no such file; accepted: {ACCEPTED_FORMS}")
        try:
            self._tok = _Tok.from_file(path)
        except Exception as e:  # the library raises its own Exception subclass for malformed files
            raise ConfigError(f"{path} is not an HF tokenizer.json ({e})") from e
        self._tok.encode_special_tokens = False  # special tokens in text -> their single ids
        self.name = os.path.basename(os.path.dirname(os.path.abspath(path))) or os.path.basename(path)
        self.path = path
        added = self._tok.get_added_tokens_decoder()  # {id: AddedToken}
        self.special_tokens = {t.content: int(i) for i, t in sorted(added.items()) if t.special}
        self._special_ids = frozenset(self.special_tokens.values())
        self.vocab_size = max([self._tok.get_vocab_size(with_added_tokens=True)] + [int(i) + 1 for i in added])

        folder = os.path.dirname(os.path.abspath(path))
        tok_cfg = os.path.join(folder, "tokenizer_config.json")
        model_cfg = os.path.join(folder, "config.json")
        tok_cfg = _read_json(tok_cfg) if os.path.isfile(tok_cfg) else {}
        model_cfg = _read_json(model_cfg) if os.path.isfile(model_cfg) else {}
        self.bos_token_id = self._resolve("bos", bos_token_id, tok_cfg, model_cfg, ())
        self.eos_token_id = self._resolve("eos", eos_token_id, tok_cfg, model_cfg, _EOS_GUESSES)
        self.pad_token_id = self._resolve("pad", pad_token_id, tok_cfg, model_cfg, ())

    def _resolve(self, kind: str, given, tok_cfg: dict, model_cfg: dict, guesses) -> int | None:
        if given is not None:
            return int(given)
        key = f"{kind}_token"
        if key in tok_cfg:
            value = tok_cfg[key]
            if isinstance(value, dict):  # older files: {"content": "<|endoftext|>", ...}
                value = value.get("content")
            if value is None:
                return None
            i = self._tok.token_to_id(str(value))
            if i is None:
                raise ConfigError(f"{self.path}: tokenizer_config.json names {key} {value!r}, which is not in the "
                                  f"vocabulary; fix the file or pass {kind}_token_id")
            return i
        value = model_cfg.get(f"{kind}_token_id")
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
        return next((self.special_tokens[t] for t in guesses if t in self.special_tokens), None)

    def _encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _encode_many(self, texts: list[str], num_threads: int | None) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(_ids_list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


# ---- dispatch -----------------------------------------------------------------------------------------------------
def load_tokenizer(spec: str | None, eos_token_id: int | None = None) -> Tokenizer:
    """``None`` or ``"bytes"`` -> :class:`Bytes`; a ``.model`` file -> :class:`SentencePieceTokenizer`; a
    ``.json`` file -> :class:`HFTokenizerFile`; a folder -> its ``tokenizer.json`` if present, else its
    ``tokenizer.model``. ``eos_token_id`` (e.g. the model's config.json ``eos_token_id``) overrides the
    tokenizer's own EOS. Anything else raises ConfigError naming the path and the accepted forms."""
    if spec is None or spec == "bytes":
        return Bytes(eos_token_id)
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, "tokenizer.json")):
            return HFTokenizerFile(spec, eos_token_id)
        if os.path.isfile(os.path.join(spec, "tokenizer.model")):
            return SentencePieceTokenizer(os.path.join(spec, "tokenizer.model"), eos_token_id=eos_token_id)
        raise ConfigError(f"tokenizer {spec}: the folder holds neither tokenizer.json nor tokenizer.model; "
                          f"accepted: {ACCEPTED_FORMS}")
    if not os.path.isfile(spec):
        raise ConfigError(f"tokenizer {spec}: no such file or folder; accepted: {ACCEPTED_FORMS}")
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec, eos_token_id=eos_token_id)
    if spec.endswith(".json"):
        return HFTokenizerFile(spec, eos_token_id)
    raise ConfigError(f"tokenizer {spec}: unknown file type; accepted: {ACCEPTED_FORMS}")
