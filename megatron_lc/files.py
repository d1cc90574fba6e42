"""Small JSON and text files: written whole or not at all (the text goes to a temporary file beside the target,
renamed over it, so a reader — another rank, a resume after a crash — sees the old file or the new one, never half
of one), and read back as the object we wrote or a clear error."""
import json
import os

from .configtools import ConfigError


def write_atomic(path: str, text: str, tmp: str | None = None) -> None:
    """Write ``text`` (str) to ``path`` atomically; ``tmp`` is the temporary file, by default ``PATH.<pid>.tmp``
    (the pid keeps ranks that write the same file from sharing one)."""
    tmp = tmp or f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, data: dict, tmp: str | None = None) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically (``write_atomic``)."""
    write_atomic(path, json.dumps(data, indent=1), tmp)


def read_json_object(path: str, fix: str, error: type[Exception] = ConfigError) -> dict | None:
    """The JSON object (dict) in ``path``, None when the file does not exist. A file that is not readable JSON, or
    holds something other than an object, raises ``error`` naming the file, what is wrong and ``fix`` (what to do:
    delete it, rewrite it, ...). JSON only: reading never runs code."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise error(f"{path}: not readable as JSON ({e}): {fix}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: a JSON {type(data).__name__}, not the object expected: {fix}")
    return data
