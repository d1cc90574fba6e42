"""Megatron's indexed token dataset (``PREFIX.bin`` + ``PREFIX.idx``): the one on-disk token format of megatron_lc.

Layout (the same bytes megatron-core's ``IndexedDatasetBuilder`` writes, so its ``IndexedDataset`` reads our files
and we read its files):

- ``.bin``: the tokens of every sequence, back to back, raw little-endian ``dtype`` (uint16 when the vocabulary
  has fewer than 65500 ids, else int32, as megatron's preprocess_data chooses).
- ``.idx``: magic ``b"MMIDIDX\\x00\\x00"``, ``<Q`` version 1, ``<B`` dtype code, ``<Q`` sequence count, ``<Q``
  length of document_indices (documents + 1), int32[seq] sequence lengths, int64[seq] byte offsets into ``.bin``,
  int64[documents + 1] document_indices (cumulative sequence counts, starting at 0). Multimodal files append
  int8[seq] modes; we accept and ignore them.

We write one document = one sequence (megatron's preprocess_data with ``--append-eod``: the caller appends EOS).
What megatron's format has no place for lives in sidecars megatron ignores: ``PREFIX.sources.npy`` (uint16 [seq],
the source id of each sequence) and ``PREFIX.meta.json`` (source names, free metadata such as the tokenizer and eos
id, the token id range, the vocabulary size the writer was given, and a fingerprint of the ``.bin`` and of the ``.idx``).

Fingerprints (``file_fingerprint``: the size and a sha256 of a few fixed chunks, so checking a TB file reads a few
MB) are checked at every open: a ``.bin`` or ``.idx`` that is not the one written with the sidecar is named, before
its document boundaries are trusted. A dataset without them (megatron's preprocess_data output) opens with one line
saying it is unverified. Its token id range is then scanned once and cached in ``PREFIX.scan.json`` (a cache, tied
to the ``.bin``'s fingerprint; delete it any time).
"""
from __future__ import annotations

import array
import hashlib
import json
import os
import struct
import sys
from collections.abc import Callable

import numpy as np

from ..configtools import ConfigError
from ..files import read_json_object, write_json

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # 34
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}
CODES = {np.dtype(t): code for code, t in DTYPES.items()}
TOKEN_DTYPES = ("uint8", "int8", "int16", "int32", "int64", "uint16")  # float codes exist but hold no token ids
UINT16_VOCAB_LIMIT = 65500  # megatron's DType.optimal_dtype: uint16 below this many ids, else int32
FINGERPRINT_CHUNKS = 8  # start, end and 6 evenly spaced in between
FINGERPRINT_CHUNK_BYTES = 1 << 20
SCAN_CHUNK_TOKENS = 1 << 24  # the token range scan's numpy block: 32-64 MB at a time, whatever the .bin's size


def token_dtype(vocab_size: int) -> np.dtype:
    """The token dtype megatron picks for a vocabulary: uint16 if ``vocab_size < 65500``, else int32."""
    if vocab_size < 1:
        raise ConfigError(f"vocab_size must be >= 1, got {vocab_size}")
    return np.dtype(np.uint16 if vocab_size < UINT16_VOCAB_LIMIT else np.int32)


def dataset_prefix(path: str | os.PathLike) -> str:
    """A dataset's prefix from ``PREFIX``, ``PREFIX.bin`` or ``PREFIX.idx`` (all three name the same dataset)."""
    path = os.fspath(path)
    for ext in (".bin", ".idx"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def _paths(prefix: str) -> dict[str, str]:
    return {"bin": prefix + ".bin", "idx": prefix + ".idx", "sources": prefix + ".sources.npy",
            "meta": prefix + ".meta.json", "scan": prefix + ".scan.json"}


def _say(message: str) -> None:
    print(f"[megatron-lc] {message}", file=sys.stderr, flush=True)


def _chunks_sha256(path: str, chunks: list[list[int]]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for start, length in chunks:
            f.seek(start)
            h.update(f.read(length))
    return h.hexdigest()


def file_fingerprint(path: str) -> dict:
    """``{"size", "chunks": [[start, length], ...], "sha256"}`` of a file: sha256 over ``FINGERPRINT_CHUNKS`` chunks
    of ``FINGERPRINT_CHUNK_BYTES`` spread evenly from its first byte to its last (the whole file when smaller).
    It tells another dataset's file, a cut-short copy or a damaged chunk from the right file; it is neither a full
    checksum nor a signature (a deliberate edit between the chunks goes unseen)."""
    size = os.path.getsize(path)
    n, c = FINGERPRINT_CHUNKS, FINGERPRINT_CHUNK_BYTES
    if size <= n * c:
        chunks = [[0, size]]
    else:
        step = (size - c) / (n - 1)
        chunks = [[round(i * step), c] for i in range(n)]
    return {"size": size, "chunks": chunks, "sha256": _chunks_sha256(path, chunks)}


def fingerprint_mismatch(path: str, recorded: dict) -> str | None:
    """Why ``path`` differs from its ``recorded`` file_fingerprint (re-read at the recorded chunks), or None."""
    size = os.path.getsize(path)
    if size != recorded["size"]:
        return f"it has {size} bytes, {recorded['size']} when the dataset was written"
    if _chunks_sha256(path, recorded["chunks"]) != recorded["sha256"]:
        return f"it has the same size ({size} bytes) as when the dataset was written but other content"
    return None


def _scan_token_range(tokens: np.ndarray) -> tuple[int, int]:
    """(min, max) of a token memmap, in SCAN_CHUNK_TOKENS blocks so memory stays flat."""
    lo, hi = None, None
    for start in range(0, len(tokens), SCAN_CHUNK_TOKENS):
        block = tokens[start:start + SCAN_CHUNK_TOKENS]
        b_lo, b_hi = int(block.min()), int(block.max())
        lo, hi = (b_lo, b_hi) if lo is None else (min(lo, b_lo), max(hi, b_hi))
    return lo, hi


class IndexedDatasetWriter:
    """Writes ``PREFIX.bin``/``.idx`` (+ sidecars) one document at a time.

    Give ``vocab_size`` (the dtype follows megatron's rule: uint16 below 65500 ids, else int32, and every id is
    checked against the vocabulary) or ``dtype`` (one of uint8, int8, int16, int32, int64, uint16). Everything is
    written under temporary names and renamed at ``finalize``; ``.idx`` is renamed last (after an old ``.idx`` of
    the same prefix is removed), so a crash never leaves a dataset that reads as complete but is not. Use it as a
    context manager to finalize on success and delete the temporary files on error.
    """

    def __init__(self, prefix: str | os.PathLike, vocab_size: int | None = None, dtype=None):
        if vocab_size is None and dtype is None:
            raise ConfigError("IndexedDatasetWriter: give vocab_size (dtype chosen as megatron does) or dtype")
        if dtype is not None:
            name = np.dtype(dtype).name
            if name not in TOKEN_DTYPES:
                raise ConfigError(f"IndexedDatasetWriter: dtype {name} cannot hold token ids: use one of "
                                  f"{', '.join(TOKEN_DTYPES)}")
            self.dtype = np.dtype(dtype)
        else:
            self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        high = np.iinfo(self.dtype).max + 1
        if vocab_size is not None and vocab_size > high:
            raise ConfigError(f"a vocabulary of {vocab_size} ids does not fit {self.dtype} (max id {high - 1}): use "
                              f"int32 or leave dtype out")
        self.max_id = min(high, vocab_size or high) - 1
        self.prefix = dataset_prefix(prefix)
        self.paths = _paths(self.prefix)
        self._tmp = {k: f"{p}.tmp{os.getpid()}" for k, p in self.paths.items()}
        os.makedirs(os.path.dirname(os.path.abspath(self.prefix)), exist_ok=True)
        # open across add_document calls; finalize/abort close it
        self._bin = open(self._tmp["bin"], "wb")  # noqa: SIM115
        self._lengths = array.array("q")
        self._sources = array.array("H")
        self._source_names: dict[str, int] = {}
        self._with_sources: bool | None = None
        self._id_range: tuple[int, int] | None = None
        self.finalized = False

    def add_document(self, tokens, source: str | None = None) -> None:
        """Append one document (any 1-D int sequence/array, EOS already appended) as one sequence; ``source`` names
        where it came from (all documents or none must have one)."""
        if self.finalized:
            raise RuntimeError(f"{self.prefix}: add_document after finalize")
        ids = np.asarray(tokens)
        n = len(self._lengths)
        if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"{self.prefix}: document {n} must be a 1-D array of integer token ids, got shape "
                             f"{ids.shape} dtype {ids.dtype}")
        if ids.size == 0:
            raise ValueError(f"{self.prefix}: document {n} is empty; a document is its tokens plus EOS, so skip "
                             f"empty texts before writing")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi > self.max_id:
            raise ValueError(f"{self.prefix}: document {n} has token ids in [{lo}, {hi}], outside [0, {self.max_id}] "
                             f"({'vocab_size ' + str(self.vocab_size) if self.vocab_size else self.dtype})")
        old = self._id_range
        self._id_range = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
        with_source = source is not None
        if self._with_sources is None:
            self._with_sources = with_source
        elif self._with_sources != with_source:
            raise ValueError(f"{self.prefix}: document {n} {'has' if with_source else 'lacks'} a source but earlier "
                             f"documents {'do not' if with_source else 'do'}: give every document a source or none")
        if with_source:
            if source not in self._source_names:
                if len(self._source_names) > np.iinfo(np.uint16).max:
                    raise ValueError(f"{self.prefix}: more than 65536 sources; source ids are uint16")
                self._source_names[source] = len(self._source_names)
            self._sources.append(self._source_names[source])
        self._bin.write(ids.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(ids.size)

    def finalize(self, meta: dict | None = None) -> str:
        """Write ``.idx`` and the sidecars (``meta``: JSON-serialisable, e.g. {"tokenizer": ..., "eos_token_id": ...}),
        rename everything to its final name and return the prefix."""
        if self.finalized:
            raise RuntimeError(f"{self.prefix}: finalize called twice")
        self._bin.close()
        lengths = np.frombuffer(self._lengths, dtype=np.int64) if self._lengths else np.zeros(0, np.int64)
        if lengths.size and lengths.max() > np.iinfo(np.int32).max:
            raise ValueError(f"{self.prefix}: a document of {lengths.max()} tokens does not fit the int32 lengths of "
                             f"the .idx format: split it")
        pointers = np.zeros(lengths.size, np.int64)
        np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        doc_indices = np.arange(lengths.size + 1, dtype=np.int64)  # one sequence per document
        with open(self._tmp["idx"], "wb") as f:
            f.write(MAGIC + struct.pack("<Q", VERSION) + struct.pack("<B", CODES[self.dtype]))
            f.write(struct.pack("<Q", lengths.size) + struct.pack("<Q", doc_indices.size))
            f.write(lengths.astype(np.int32).tobytes() + pointers.tobytes() + doc_indices.tobytes())
        lo, hi = self._id_range or (None, None)
        side = {"num_sequences": int(lengths.size), "num_tokens": int(lengths.sum()),
                "source_names": list(self._source_names) if self._with_sources else None, "meta": meta or {},
                "min_token_id": lo, "max_token_id": hi, "vocab_size": self.vocab_size,
                "files": {"bin": file_fingerprint(self._tmp["bin"]), "idx": file_fingerprint(self._tmp["idx"])}}
        with open(self._tmp["meta"], "w") as f:
            json.dump(side, f, indent=1)
        renames = ["bin", "meta"]
        if self._with_sources:
            with open(self._tmp["sources"], "wb") as f:
                np.save(f, np.frombuffer(self._sources, dtype=np.uint16))
            renames.append("sources")
        elif os.path.exists(self.paths["sources"]):
            os.remove(self.paths["sources"])  # a stale sidecar of an older dataset under this prefix
        if os.path.exists(self.paths["scan"]):
            os.remove(self.paths["scan"])  # our scan cache of an older dataset under this prefix
        if os.path.exists(self.paths["idx"]):
            os.remove(self.paths["idx"])  # until the new .idx lands, the prefix reads as incomplete
        for key in renames + ["idx"]:
            os.replace(self._tmp[key], self.paths[key])
        self.finalized = True
        return self.prefix

    def abort(self) -> None:
        """Close and delete the temporary files (nothing under the final names changes)."""
        self._bin.close()
        for path in self._tmp.values():
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self.finalized:
            self.finalize()
        elif exc_type is not None:
            self.abort()


class IndexedDataset:
    """Reads a Megatron indexed dataset with numpy memmaps; ``path`` is ``PREFIX``, ``PREFIX.bin`` or ``PREFIX.idx``.

    ``len()`` is the number of sequences; ``sequence_lengths`` int32 [seq], ``sequence_pointers`` int64 [seq] (byte
    offsets), ``document_indices`` int64 [documents + 1]; ``sources`` uint16 [seq] or None without the sidecar,
    ``source_names``, ``meta`` (the sidecar's free metadata, {} without one), ``vocab_size`` (the vocabulary the
    data was written for: the writer's ``vocab_size`` or the meta's, None when not recorded); ``verified``: the .bin and .idx match
    the fingerprints written with them. Bad files raise ConfigError naming the file and what was expected. ``log``
    receives the one-line notes (unverified dataset, token range scans); default: stderr.
    """

    def __init__(self, path: str | os.PathLike, log: Callable[[str], None] | None = _say):
        self.prefix = dataset_prefix(path)
        self.paths = _paths(self.prefix)
        self._log = log or (lambda _: None)
        idx, bin_ = self.paths["idx"], self.paths["bin"]
        for p in (idx, bin_):
            if not os.path.isfile(p):
                raise ConfigError(f"{p} not found: a dataset is PREFIX.bin + PREFIX.idx (megatron's indexed format, "
                                  f"written by megatron_lc.data.indexed.IndexedDatasetWriter or megatron's "
                                  f"preprocess_data); give the prefix or either file")
        size = os.path.getsize(idx)
        if size < HEADER_BYTES:
            raise ConfigError(f"{idx}: {size} bytes, shorter than the {HEADER_BYTES}-byte header: truncated file")
        with open(idx, "rb") as f:
            head = f.read(HEADER_BYTES)
        if head[:9] != MAGIC:
            raise ConfigError(f"{idx}: magic {head[:9]!r}, expected {MAGIC!r}: not a megatron indexed dataset index")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
        if version != VERSION:
            raise ConfigError(f"{idx}: version {version}, expected {VERSION}")
        if code not in DTYPES or np.dtype(DTYPES[code]).name not in TOKEN_DTYPES:
            valid = {c: np.dtype(t).name for c, t in DTYPES.items() if np.dtype(t).name in TOKEN_DTYPES}
            raise ConfigError(f"{idx}: dtype code {code} is not an integer token dtype (expected one of {valid})")
        self.dtype = np.dtype(DTYPES[code])
        expected = HEADER_BYTES + 12 * n_seq + 8 * n_doc
        if size not in (expected, expected + n_seq):  # + int8 modes in multimodal files
            raise ConfigError(f"{idx}: {size} bytes, but its header ({n_seq} sequences, {n_doc} document indices) "
                              f"needs {expected}: truncated or corrupt index")
        self._side = side = self._load_sidecar()
        bin_size = os.path.getsize(bin_)
        self.verified = self._verify_files(side, n_seq, bin_size // self.dtype.itemsize)
        buf = np.memmap(idx, dtype=np.uint8, mode="r")
        self.sequence_lengths = np.frombuffer(buf, np.int32, n_seq, HEADER_BYTES)
        self.sequence_pointers = np.frombuffer(buf, np.int64, n_seq, HEADER_BYTES + 4 * n_seq)
        self.document_indices = np.frombuffer(buf, np.int64, n_doc, HEADER_BYTES + 12 * n_seq)
        if n_doc < 1 or self.document_indices[0] != 0 or self.document_indices[-1] != n_seq:
            raise ConfigError(f"{idx}: document_indices must run from 0 to the sequence count {n_seq}, got "
                              f"{self.document_indices[:1].tolist()}..{self.document_indices[-1:].tolist()}")
        end = int(self.sequence_pointers[-1] + self.sequence_lengths[-1] * self.dtype.itemsize) if n_seq else 0
        if bin_size != end:  # without fingerprints the sizes cannot tell which of the two is wrong
            raise ConfigError(f"{idx} and {bin_} disagree: the .idx ({size} bytes, {n_seq} sequences) says the "
                              f"tokens end at byte {end}, but {bin_} has {bin_size} bytes: one of them belongs to "
                              f"another dataset or was cut short (e.g. an interrupted copy); copy both again from "
                              f"where the dataset was written, or rewrite the dataset")
        self.num_tokens = bin_size // self.dtype.itemsize
        self.tokens = (np.memmap(bin_, dtype=self.dtype, mode="r") if bin_size else np.zeros(0, self.dtype))
        self._read_sidecars(side)
        self._fingerprint = None
        self._id_range: tuple[int, int] | None | bool = False  # False: not looked up yet

    def _load_sidecar(self) -> dict | None:
        return read_json_object(self.paths["meta"], "delete it (the dataset then opens unverified) or rewrite the "
                                                    "dataset")

    def _verify_files(self, side: dict | None, n_seq: int, n_tokens: int) -> bool:
        """Check .bin and .idx against the fingerprints written with them; True when both match, False (and one
        line to the log) when there are none to check."""
        files = (side or {}).get("files")
        if not files:
            why = f"{self.paths['meta']} predates fingerprints" if side else \
                f"no {self.paths['meta']} (megatron's preprocess_data writes none)"
            self._log(f"{self.prefix}: unverified dataset: {why}, so a .bin/.idx pair that does not belong together "
                      f"cannot be told; datasets written by megatron_lc (IndexedDatasetWriter, data tokenize/mix) "
                      f"carry fingerprints")
            return False
        bin_, idx, meta = self.paths["bin"], self.paths["idx"], self.paths["meta"]
        try:
            bad_bin, bad_idx = fingerprint_mismatch(bin_, files["bin"]), fingerprint_mismatch(idx, files["idx"])
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{meta}: its 'files' fingerprints are not what our writer stores ({e!r}): delete it "
                              f"(the dataset then opens unverified) or rewrite the dataset") from e
        if bad_bin and bad_idx:
            raise ConfigError(f"{meta} belongs to another dataset: neither {bin_} nor {idx} matches the fingerprints "
                              f"it recorded ({side.get('num_sequences')} sequences / {side.get('num_tokens')} tokens "
                              f"then, {n_seq} / {n_tokens} now): a stale sidecar, e.g. the .bin/.idx were rewritten "
                              f"by another tool; delete {meta} (and {self.paths['sources']}) if the .bin/.idx are "
                              f"the data you want, or rewrite the dataset")
        if bad_idx:
            raise ConfigError(f"{idx} does not match {bin_}: {bad_idx} (fingerprints in {meta}), so its document "
                              f"boundaries are not this .bin's: the .idx belongs to another dataset or was changed; "
                              f"copy it again from where the dataset was written, or rewrite the dataset")
        if bad_bin:
            raise ConfigError(f"{bin_} does not match {idx}: {bad_bin} (fingerprints in {meta}): the .bin was cut "
                              f"short, damaged or belongs to another dataset; copy it again from where the dataset "
                              f"was written, or rewrite the dataset")
        return True

    def _read_sidecars(self, side: dict | None) -> None:
        self.sources, self.source_names, self.meta, self.vocab_size = None, None, {}, None
        if side is None:
            return
        if side.get("num_sequences") != len(self) or side.get("num_tokens") != self.num_tokens:
            raise ConfigError(f"{self.paths['meta']} describes {side.get('num_sequences')} sequences / "
                              f"{side.get('num_tokens')} tokens but the dataset has {len(self)} / {self.num_tokens}: "
                              f"a stale sidecar; delete it or rewrite the dataset")
        self.meta = side.get("meta") or {}
        vocab = side.get("vocab_size") or self.meta.get("vocab_size")  # the writer's, else a tokenizer's record
        self.vocab_size = int(vocab) if isinstance(vocab, int) and not isinstance(vocab, bool) else None
        self.source_names = side.get("source_names")
        if self.source_names is not None:
            self.sources = np.load(self.paths["sources"], mmap_mode="r")
            if self.sources.shape != (len(self),):
                raise ConfigError(f"{self.paths['sources']}: shape {self.sources.shape}, expected ({len(self)},)")

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``i`` (to its end when length is None): a read-only
        ``dtype`` view of the memmap (copy it to keep it)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.prefix}: sequence {i} out of range for {n} sequences")
        size = int(self.sequence_lengths[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"{self.prefix}: tokens [{offset}, {offset + length}) out of range for sequence {i} of "
                             f"{size} tokens")
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        return self.tokens[start:start + length]

    def token_id_range(self) -> tuple[int, int] | None:
        """(min, max) token id, None for a dataset without tokens: from the sidecar written with the dataset, else
        from the scan cache ``PREFIX.scan.json`` while its .bin fingerprint matches, else scanned now (once per
        process) and cached there if the folder is writable."""
        if self._id_range is False:
            self._id_range = self._find_token_range()
        return self._id_range

    def _find_token_range(self) -> tuple[int, int] | None:
        side = self._side if self.verified else None
        if side is not None and "max_token_id" in side:
            return None if side["max_token_id"] is None else (int(side["min_token_id"]), int(side["max_token_id"]))
        if self.num_tokens == 0:
            return None
        cache, bin_ = self.paths["scan"], self.paths["bin"]
        try:
            with open(cache) as f:
                cached = json.load(f)
            if fingerprint_mismatch(bin_, cached["bin"]) is None:
                return int(cached["min_token_id"]), int(cached["max_token_id"])
        except (OSError, ValueError, KeyError, TypeError):  # no cache, or one we cannot read: scan
            pass
        self._log(f"{self.prefix}: scanning {bin_} once for its token id range ({self.num_tokens:,} tokens; its "
                  f"sidecar does not record it)")
        lo, hi = _scan_token_range(self.tokens)
        try:
            write_json(cache, {"bin": file_fingerprint(bin_), "min_token_id": lo, "max_token_id": hi})
        except OSError as e:
            self._log(f"{self.prefix}: cannot cache the scan in {cache} ({e}): the range is kept in memory, so every "
                      f"process that opens the dataset scans it again")
        return lo, hi

    def fingerprint(self) -> str:
        """A short hash of what identifies the data (dtype, sequence lengths, document indices, the first and last
        tokens), not of its path: a moved dataset keeps it, a rewritten one almost surely changes it. The loader
        stores it in checkpoints to refuse resuming on other data (``file_fingerprint`` checks the files)."""
        if self._fingerprint is None:
            h = hashlib.sha1(self.dtype.name.encode())
            for a in (self.sequence_lengths, self.document_indices, self.tokens[:4096], self.tokens[-4096:]):
                h.update(np.ascontiguousarray(a).tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.prefix!r}: {len(self)} sequences, {len(self.document_indices) - 1} documents, "
                f"{self.num_tokens} {self.dtype} tokens)")
