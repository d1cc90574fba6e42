"""Files written whole or not at all: the text goes to a temporary file beside the target, renamed over it.

A reader (another rank, a resume after a crash) sees the old file or the new one, never half of one."""
import json
import os


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
