"""Error texts for clients carry no local paths.

An exception's text often names files ("No such file or directory: '/home/u/.cache/vllama/
models/...'", a tokenizer's path in a template error): passed on to a client, it tells anyone
who can send a request where the server keeps its files and under which user it runs. Messages
built from such texts go through ``without_paths``: a known directory becomes the name the
client knows (the model's), any other absolute path becomes ``<path>``.
"""

from __future__ import annotations

import re
from os import PathLike

# PosixPath('/x/y') and the like, whole; then bare absolute paths of two parts or more. A path
# is not preceded by a word character, ':' or '/' (so the path part of a URL is left alone).
_PATH_REPR = re.compile(r"\b(?:Posix|Windows|Pure\w*)?Path\((['\"]).*?\1\)")
_ABSOLUTE = re.compile(r"(?<![\w:/.~-])~?/(?:[\w.@+=,-]+/)+[\w.@+=,-]*")


def without_paths(text: str, known: dict[str | PathLike[str], str] | None = None) -> str:
    """``text`` with each ``known`` path (longest first) replaced by its name, then any other
    absolute path by ``<path>``."""
    for path, name in sorted((known or {}).items(), key=lambda item: -len(str(item[0]))):
        if str(path) not in ("", "/"):
            text = text.replace(str(path), name)
    text = _PATH_REPR.sub("<path>", text)
    return _ABSOLUTE.sub("<path>", text)
