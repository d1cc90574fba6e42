"""Packed GPT samples over an indexed dataset, and blends of several datasets.

``GPTSamples`` packs across document boundaries, Megatron style. Epoch e visits the dataset's sequences (one per
document as our writer stores them; megatron's GPTDataset also samples sequences) in an order shuffled by
``RandomState([seed, e])`` and concatenates them into one token stream (each document already ends with EOS).
Sample k of the epoch is tokens ``[k * seq_len, k * seq_len + seq_len + 1)`` of that stream, so consecutive
samples share one boundary token and an epoch of T tokens gives ``N = (T - 1) // seq_len`` samples; the at most
``seq_len - 1`` tokens left at the end of the stream are not in that epoch's samples (the next epoch's order puts
other documents last). The epoch's indices are numpy arrays, as in Megatron: document index (sequence ids in
visiting order), sample index ``[N + 1, 2]`` of (position in the document index, token offset) where each sample
starts (row N: where the last one ends), and shuffle index (the order the epoch's N samples are served, from the
same RandomState). Global sample ``i`` is sample ``shuffle[i % N]`` of epoch ``i // N``, so the sample stream is
endless and every sample is served once per epoch. The indices are built in memory when an epoch is first touched
(O(documents + samples) numpy work) and not cached on disk.

A sample is a dict of int64 ``[seq_len]`` tensors: ``input_ids = tokens[:-1]``, ``labels = tokens[1:]`` (aligned:
``labels[t]`` is the target of position t), ``position_ids``; see ``GPTSamples`` for the EOS options.

``BlendedSamples`` interleaves several sample sources by weight with Megatron's error-greedy rule: global sample i
comes from the source whose count lags its share the most, ``argmax_d(w_d * max(i, 1) - count_d)`` (the lowest d
on ties), so after n samples every source's count is within a sample or two of ``w_d * n``; deterministic.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch

from ..configtools import ConfigError
from .indexed import IndexedDataset


class GPTSamples:
    """Fixed-length packed samples of ``dataset`` (an IndexedDataset or a path/prefix of one).

    ``sample(i)`` -> {input_ids, labels, position_ids} int64 ``[seq_len]`` (+ ``document_ids`` when asked).
    Options (need ``eos_token_id``, else the dataset meta's ``eos_token_id``):

    - ``reset_position_ids``: positions restart at 0 on the token after each EOS in ``input_ids`` (the first
      token of the next document); the first token of a sample is position 0 even mid-document, as in Megatron.
    - ``eod_mask_loss``: ``labels[t] = -100`` where ``input_ids[t]`` is EOS, i.e. no loss on predicting the first
      token of the next document from the previous one's EOS (Megatron's eod_mask_loss). Predicting EOS itself at
      the end of a document keeps its loss.
    - ``document_ids``: add ``document_ids`` [seq_len] int64: 0 for the tokens up to and including the first EOS
      of ``input_ids``, then 1, ... (``cu_seqlens`` for varlen attention are the positions where it changes).

    ``shuffle=False`` keeps file order for both documents and samples (validation). ``vocab_size`` checks every
    served id.
    """

    def __init__(self, dataset: IndexedDataset | str, seq_len: int, seed: int = 0, shuffle: bool = True, *,
                 eos_token_id: int | None = None, reset_position_ids: bool = False, eod_mask_loss: bool = False,
                 document_ids: bool = False, vocab_size: int | None = None):
        self.dataset = dataset if isinstance(dataset, IndexedDataset) else IndexedDataset(dataset)
        if seq_len < 1:
            raise ConfigError(f"seq_len must be >= 1, got {seq_len}")
        if not 0 <= seed < 2**32:
            raise ConfigError(f"the data seed must be in [0, 2**32), got {seed}")
        self.seq_len, self.seed, self.shuffle, self.vocab_size = seq_len, seed, shuffle, vocab_size
        self.reset_position_ids, self.eod_mask_loss, self.document_ids = reset_position_ids, eod_mask_loss, document_ids
        if eos_token_id is None:
            eos_token_id = self.dataset.meta.get("eos_token_id")
        if eos_token_id is None and (reset_position_ids or eod_mask_loss or document_ids):
            raise ConfigError(f"{self.dataset.prefix}: reset_position_ids / eod_mask_loss / document_ids need the EOS "
                              f"id: give eos_token_id (data.eos_token_id) or write it into the dataset meta "
                              f"(finalize(meta={{'eos_token_id': ...}}))")
        self.eos_token_id = eos_token_id
        self.lengths = self.dataset.sequence_lengths.astype(np.int64)
        total = int(self.lengths.sum())
        self.samples_per_epoch = (total - 1) // seq_len if total else 0
        if self.samples_per_epoch < 1:
            raise ConfigError(f"{self.dataset.prefix} holds {total} tokens, fewer than one sample of seq_len + 1 = "
                              f"{seq_len + 1}: use more data or a shorter seq_len")
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()

    def epoch_indices(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document index int64 [sequences], sample index int64 [N + 1, 2], shuffle index int64 [N]) of ``epoch``."""
        if epoch in self._epochs:
            self._epochs.move_to_end(epoch)
            return self._epochs[epoch]
        n_seq, n = len(self.lengths), self.samples_per_epoch
        if self.shuffle:
            rng = np.random.RandomState([self.seed, epoch])
            doc_index = rng.permutation(n_seq).astype(np.int64)
        else:
            rng, doc_index = None, np.arange(n_seq, dtype=np.int64)
        ends = np.cumsum(self.lengths[doc_index])
        starts_tok = np.arange(n + 1, dtype=np.int64) * self.seq_len
        pos = np.searchsorted(ends, starts_tok, side="right")  # the sequence holding each start token
        sample_index = np.stack([pos, starts_tok - (ends[pos] - self.lengths[doc_index[pos]])], axis=1)
        shuffle_index = rng.permutation(n).astype(np.int64) if rng is not None else np.arange(n, dtype=np.int64)
        self._epochs[epoch] = (doc_index, sample_index, shuffle_index)
        if len(self._epochs) > 2:  # a micro-batch spans at most two epochs
            self._epochs.popitem(last=False)
        return self._epochs[epoch]

    def tokens(self, index: int) -> np.ndarray:
        """The ``seq_len + 1`` tokens (int64) of global sample ``index``."""
        if index < 0:
            raise IndexError(f"sample index must be >= 0, got {index}")
        epoch, k = divmod(index, self.samples_per_epoch)
        doc_index, sample_index, shuffle_index = self.epoch_indices(epoch)
        k = int(shuffle_index[k])
        (p0, o0), (p1, o1) = sample_index[k], sample_index[k + 1]
        get = self.dataset.get
        if p0 == p1:
            parts = [get(int(doc_index[p0]), int(o0), int(o1 - o0 + 1))]
        else:
            parts = [get(int(doc_index[p0]), int(o0))]
            parts += [get(int(doc_index[p])) for p in range(p0 + 1, p1)]
            parts.append(get(int(doc_index[p1]), 0, int(o1) + 1))
        out = np.concatenate(parts).astype(np.int64)
        assert out.size == self.seq_len + 1, (index, out.size)
        if self.vocab_size is not None and out.size and (out.max() >= self.vocab_size or out.min() < 0):
            raise ValueError(f"{self.dataset.prefix}: sample {index} holds token id {int(out.max())} (min "
                             f"{int(out.min())}), outside the model's vocabulary of {self.vocab_size}")
        return out

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        """Global sample ``index`` as a dict of int64 ``[seq_len]`` tensors (see the class docstring)."""
        return make_sample(self.tokens(index), self.eos_token_id, self.reset_position_ids, self.eod_mask_loss,
                           self.document_ids)

    def fingerprint(self) -> str:
        """What fixes the sample order besides the seed: the dataset's fingerprint, seq_len and shuffle."""
        return fingerprint_of("gpt", self.dataset.fingerprint(), self.seq_len, self.shuffle)

    def identity(self) -> dict:
        """{seed, seq_len, fingerprint}: the loader stores it to refuse resuming on other data."""
        return {"seed": self.seed, "seq_len": self.seq_len, "fingerprint": self.fingerprint()}


def make_sample(tokens: np.ndarray, eos_token_id: int | None = None, reset_position_ids: bool = False,
                eod_mask_loss: bool = False, document_ids: bool = False) -> dict[str, torch.Tensor]:
    """``tokens`` int [S + 1] -> {input_ids, labels, position_ids (, document_ids)} int64 [S]; options as in
    GPTSamples."""
    ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    input_ids, labels = ids[:-1].clone(), ids[1:].clone()
    s = input_ids.numel()
    positions = torch.arange(s)
    out = {"input_ids": input_ids, "labels": labels, "position_ids": positions}
    if eos_token_id is None or not (reset_position_ids or eod_mask_loss or document_ids):
        return out
    is_eos = input_ids == eos_token_id
    doc = torch.cumsum(is_eos.long(), 0) - is_eos.long()  # an EOS belongs to the document it ends
    if reset_position_ids:
        starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.nonzero(is_eos).flatten() + 1])
        out["position_ids"] = positions - starts[doc]
    if eod_mask_loss:
        labels[is_eos] = -100
    if document_ids:
        out["document_ids"] = doc
    return out


def blending_indices(weights, n: int, start: int = 0, counts=None) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's error-greedy blend for global samples ``[start, start + n)``: (source index int16 [n], sample
    index within the source int64 [n]). ``weights`` are normalised here; ``counts`` (int64 [sources], updated in
    place) are the per-source counts before ``start``."""
    w = [float(x) for x in np.asarray(weights, dtype=np.float64) / np.sum(weights)]
    counts = np.zeros(len(w), np.int64) if counts is None else counts
    c = [int(x) for x in counts]
    src, idx = np.empty(n, np.int16), np.empty(n, np.int64)
    d_range = range(1, len(w))
    for j in range(n):
        i = float(max(start + j, 1))
        best, best_err = 0, w[0] * i - c[0]
        for d in d_range:
            err = w[d] * i - c[d]
            if err > best_err:
                best, best_err = d, err
        src[j], idx[j] = best, c[best]
        c[best] += 1
    counts[:] = c
    return src, idx


class BlendedSamples:
    """Samples drawn from several sources (GPTSamples or any object with ``sample``, ``seq_len``, ``identity``) in
    proportion to ``weights`` (> 0; normalised), interleaved by Megatron's error-greedy rule. Source d's j-th draw
    is its global sample j, so each source runs through its own epochs independently."""

    CHUNK = 4096

    def __init__(self, sources: list, weights: list[float]):
        if not sources or len(sources) != len(weights):
            raise ConfigError(f"a blend needs one weight per source, got {len(sources)} sources and {len(weights)} "
                              f"weights")
        if any(not np.isfinite(w) or w <= 0 for w in weights):
            raise ConfigError(f"blend weights must be finite and > 0 (drop a source instead of weighting it 0), got "
                              f"{list(weights)}")
        lens = {s.seq_len for s in sources}
        if len(lens) != 1:
            raise ConfigError(f"every source of a blend needs the same seq_len, got {sorted(lens)}")
        self.sources, self.seq_len = list(sources), lens.pop()
        self.weights = np.asarray(weights, np.float64) / np.sum(weights)
        self.seed = sources[0].identity()["seed"]
        self._src = np.zeros(0, np.int16)
        self._idx = np.zeros(0, np.int64)
        self._counts = np.zeros(len(sources), np.int64)

    def locate(self, index: int) -> tuple[int, int]:
        """(source, that source's sample index) of global sample ``index``."""
        while index >= len(self._src):  # extend lazily: the greedy only needs the counts so far
            grow = max(self.CHUNK, len(self._src))
            src, idx = blending_indices(self.weights, grow, len(self._src), self._counts)
            self._src, self._idx = np.concatenate([self._src, src]), np.concatenate([self._idx, idx])
        return int(self._src[index]), int(self._idx[index])

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        d, j = self.locate(index)
        return self.sources[d].sample(j)

    def identity(self) -> dict:
        ids = [s.identity() for s in self.sources]
        return {"seed": self.seed, "seq_len": self.seq_len,
                "fingerprint": fingerprint_of("blend", [round(float(w), 12) for w in self.weights],
                                     [(i["seed"], i["fingerprint"]) for i in ids])}


def fingerprint_of(*parts) -> str:
    """A short (16 hex digits) sha1 of ``repr(parts)``: the identity of a sample source, stored in checkpoints."""
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:16]
