"""Documents in: JSONL / JSONL.gz (and Parquet when pyarrow is installed), streamed, with every bad line reported.

A corpus is one or more files; each record is a JSON object with a text field and a source (domain) field, names
configurable (``text_key``, ``source_key``); every other field of a record (``path``, ``url``, ...) travels with
the document as ``Document.extra`` and the cleaning stages write it back out. A record without the source field
takes ``default_source`` if given, else its file's name without extensions (``books.jsonl.gz`` -> ``books``), so a
corpus laid out one file per source needs no source field; the report counts how many records got their source
that way.

Nothing is dropped silently: every line is one of ``documents``, ``blank`` or ``corrupt`` in ``ReadReport`` and the
three add up to ``lines``. A corrupt line (bad JSON, not an object, no text field, text not a string, bad UTF-8, a
truncated gzip stream) is recorded with its file and 1-based line number; ``on_error="fail"`` raises instead.
Files are read line by line (gzip streamed), so a corpus larger than memory is fine.

A file that cannot be read to its end (a truncated or damaged gzip stream, an I/O error) loses an unknown amount of
input, unlike a bad line: it is also listed in ``ReadReport.unreadable``, and the commands then end with
``INPUT_LOST_STATUS`` unless partial input was accepted (``--allow-partial-input``).
"""
from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ..configtools import ConfigError

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
ON_ERROR = ("skip", "fail")
INPUT_LOST_STATUS = 65
"""Exit status of a data command whose input was cut short (sysexits' EX_DATAERR): distinct from errors (1) and
usage errors (2), so a script can tell "finished on partial input" from "finished"."""


@dataclass(frozen=True)
class Document:
    """One input document: its ``text``, ``source`` (domain name), where it came from (``file:line``) and the
    record's other fields (``extra``, e.g. ``{"path": "lib/os.py"}``), kept so every stage can write them out."""

    text: str
    source: str
    where: str
    extra: dict = field(default_factory=dict, compare=False)


@dataclass
class ReadReport:
    """Counts of one read; ``lines == documents + blank + corrupt`` always holds."""

    files: int = 0
    lines: int = 0
    documents: int = 0
    blank: int = 0
    corrupt: int = 0
    source_from_file: int = 0
    bytes_read: int = 0
    corrupt_lines: list[str] = field(default_factory=list)
    """``file:line: reason`` of the first ``max_listed`` corrupt lines (all are counted)."""
    unreadable: list[str] = field(default_factory=list)
    """``file:line: reason`` of every file not readable to its end: what followed that line is lost, uncounted."""
    max_listed: int = 1000

    def add_corrupt(self, where: str, reason: str) -> None:
        self.corrupt += 1
        if len(self.corrupt_lines) < self.max_listed:
            self.corrupt_lines.append(f"{where}: {reason}")

    def merge(self, other: ReadReport) -> None:
        for name in ("files", "lines", "documents", "blank", "corrupt", "source_from_file", "bytes_read"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        room = self.max_listed - len(self.corrupt_lines)
        self.corrupt_lines.extend(other.corrupt_lines[:max(0, room)])
        self.unreadable.extend(other.unreadable)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("files", "lines", "documents", "blank", "corrupt", "source_from_file",
                                              "bytes_read", "corrupt_lines", "unreadable")}

    def format(self) -> str:
        text = (f"read {self.files} files, {self.lines:,} lines: {self.documents:,} documents, {self.blank:,} blank, "
                f"{self.corrupt:,} corrupt ({self.bytes_read / 1e6:,.1f} MB)")
        if self.source_from_file:
            text += f"; {self.source_from_file:,} documents took their source from the file name"
        for line in self.corrupt_lines[:20]:
            text += f"\n  corrupt: {line}"
        if self.corrupt > 20:
            text += f"\n  ... {self.corrupt - 20:,} more corrupt lines (all listed in the JSON report up to " \
                    f"{self.max_listed})"
        return text


def input_lost_line(read: dict, accepted: bool) -> str | None:
    """The summary line for a read (``ReadReport.as_dict()``) that lost input, or None when every file was read to
    its end; ``accepted``: partial input was accepted (``--allow-partial-input``)."""
    lost = read.get("unreadable") or []
    if not lost:
        return None
    head = (f"INPUT LOST: {len(lost)} of {read['files']} input files could not be read to the end, so the output "
            f"lacks whatever followed: {'; '.join(lost[:5])}{' ...' if len(lost) > 5 else ''}")
    if accepted:
        return f"{head} (accepted by --allow-partial-input)"
    return (f"{head}. Exit status {INPUT_LOST_STATUS}: fetch the files again (e.g. `gzip -t FILE` finds the broken "
            f"ones), or pass --allow-partial-input to accept what was read")


def input_status(read: dict, accepted: bool) -> int:
    """A data stage's exit status from its read report (``ReadReport.as_dict()``): 0 when every file was read to its
    end; else it prints the INPUT LOST line (``input_lost_line``) last and returns INPUT_LOST_STATUS, or 0 when
    ``accepted`` (``--allow-partial-input``)."""
    line = input_lost_line(read, accepted)
    if line is None:
        return 0
    print(line, flush=True)
    return 0 if accepted else INPUT_LOST_STATUS


def expand_inputs(paths: Iterable[str]) -> list[str]:
    """Files of ``paths`` (folders are searched recursively for the supported suffixes), sorted per folder; a path
    that does not exist or holds no input is a ConfigError."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                           if name.endswith(SUFFIXES))
            if not found:
                raise ConfigError(f"input folder {path} holds no {', '.join(SUFFIXES)} files")
            files.extend(found)
        elif os.path.isfile(path):
            if not path.endswith(SUFFIXES):
                raise ConfigError(f"input {path}: unsupported file type; use one of {', '.join(SUFFIXES)}")
            files.append(path)
        else:
            raise ConfigError(f"input {path}: no such file or folder")
    return files


def source_of_file(path: str) -> str:
    """``/data/books.jsonl.gz`` -> ``books``."""
    name = os.path.basename(path)
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


def raw_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes without the newline) of a JSONL or gzipped JSONL file. A gzip stream that
    ends early raises EOFError after the last complete line (the caller reports it at the next line number)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for number, line in enumerate(f, 1):
            yield number, line.rstrip(b"\r\n")


def parse_line(raw: bytes, where: str, text_key: str, source_key: str, fallback_source: str
               ) -> tuple[Document | None, str | None, bool]:
    """(document, None, source_from_file) for a good line; (None, reason, False) for a corrupt one;
    (None, None, False) for a blank one."""
    if not raw.strip():
        return None, None, False
    try:
        record = json.loads(raw)
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 ({e.reason} at byte {e.start})", False
    except json.JSONDecodeError as e:
        return None, f"bad JSON ({e.msg} at column {e.colno})", False
    if not isinstance(record, dict):
        return None, f"a JSON {type(record).__name__}, not an object", False
    text = record.get(text_key)
    if text is None:
        return None, f"no '{text_key}' field (keys: {', '.join(list(record)[:8])}); set --text-key", False
    if not isinstance(text, str):
        return None, f"'{text_key}' is a {type(text).__name__}, not a string", False
    source = record.get(source_key)
    extra = {k: v for k, v in record.items() if k not in (text_key, source_key)}
    if source is None:
        return Document(text, fallback_source, where, extra), None, True
    return Document(text, str(source), where, extra), None, False


def iter_documents(paths: Iterable[str], text_key: str = "text", source_key: str = "source",
                   default_source: str | None = None, on_error: str = "skip",
                   report: ReadReport | None = None) -> Iterator[Document]:
    """Stream the documents of ``paths`` (files or folders) in file order; ``report`` (if given) is updated as it
    goes. ``on_error``: ``skip`` reports corrupt lines and goes on, ``fail`` raises ConfigError at the first."""
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    report = report if report is not None else ReadReport()
    for path in expand_inputs(paths):
        report.files += 1
        fallback = default_source if default_source is not None else source_of_file(path)
        if path.endswith(".parquet"):
            yield from _parquet_documents(path, text_key, source_key, fallback, on_error, report)
            continue
        number = 0
        lines = raw_lines(path)
        while True:
            try:
                number, raw = next(lines)
            except StopIteration:
                break
            except (EOFError, OSError, gzip.BadGzipFile) as e:  # truncated or damaged gzip: the rest is unreadable
                number += 1
                report.lines += 1
                reason = f"unreadable from here on ({type(e).__name__}: {e})"
                _corrupt(report, f"{path}:{number}", reason, on_error)
                report.unreadable.append(f"{path}:{number}: {reason}")
                break
            report.lines += 1
            report.bytes_read += len(raw) + 1
            doc, reason, from_file = parse_line(raw, f"{path}:{number}", text_key, source_key, fallback)
            if doc is not None:
                report.documents += 1
                report.source_from_file += from_file
                yield doc
            elif reason is None:
                report.blank += 1
            else:
                _corrupt(report, f"{path}:{number}", reason, on_error)


def _corrupt(report: ReadReport, where: str, reason: str, on_error: str) -> None:
    if on_error == "fail":
        raise ConfigError(f"{where}: {reason} (pass --on-error skip to report such lines and go on)")
    report.add_corrupt(where, reason)


def _parquet_documents(path, text_key, source_key, fallback, on_error, report) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ConfigError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or convert it to JSONL") from e
    table = pq.ParquetFile(path)
    if text_key not in table.schema_arrow.names:
        raise ConfigError(f"{path}: no '{text_key}' column (columns: {', '.join(table.schema_arrow.names)}); set "
                          f"--text-key")
    others = [c for c in table.schema_arrow.names if c not in (text_key, source_key)]
    row = 0
    for batch in table.iter_batches(batch_size=4096):  # every column: the others travel as Document.extra
        data = batch.to_pydict()
        sources = data.get(source_key, [None] * batch.num_rows)
        for j, (text, source) in enumerate(zip(data[text_key], sources)):
            row += 1
            report.lines += 1
            where = f"{path}:{row}"
            if not isinstance(text, str):
                _corrupt(report, where, f"'{text_key}' is {type(text).__name__}, not a string", on_error)
                continue
            report.bytes_read += len(text.encode("utf-8", "surrogatepass"))
            report.documents += 1
            report.source_from_file += source is None
            extra = {c: data[c][j] for c in others}
            yield Document(text, fallback if source is None else str(source), where, extra)
