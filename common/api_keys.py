"""API keys: who a request is (its principal), read from VLLAMA_API_KEYS and VLLAMA_API_KEY.

The keys file holds one key per line, ``name sha256-hex-of-key [admin]``, with ``#``
comments. Only the hashes are stored, so the file (or a copy of it in a backup) does not give
the keys away; a request's key is hashed and looked up. The lookup is on a hash of a secret,
so its timing says nothing useful about the key. A key's name is what its jobs, files and
batches record as their owner and what /metrics labels its usage with, so names are short
identifiers: the label space stays bounded by the file.

This module is in common/ because the settings check the file at start (a bad line stops
the server naming the line, before anything else starts), and the API uses what it reads.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
HEX64 = re.compile(r"[0-9a-f]{64}")
SINGLE_KEY_NAME = "admin"  # VLLAMA_API_KEY's name: it is an admin key


@dataclass(frozen=True)
class Principal:
    """Who a request is. ``name`` is the key's name (None: no keys are configured, so there is
    one anonymous owner); ``admin`` sees and acts on every client's objects."""

    name: str | None
    admin: bool


# No key configured: every request is this one owner and sees everything, as before keys.
ANONYMOUS = Principal(name=None, admin=True)


class KeyFileError(ValueError):
    """A keys file that cannot be used; the message names the file and the line."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random key: 32 random bytes, URL-safe, with a prefix that makes a leaked one
    easy to recognise (and to search for in logs)."""
    return "vllama-" + secrets.token_urlsafe(32)


def key_line(name: str, key: str, admin: bool = False) -> str:
    """The keys file's line for ``key``."""
    return f"{name} {hash_key(key)}{' admin' if admin else ''}"


def parse_key_file(text: str, source: str = "the keys file") -> dict[str, Principal]:
    """The file's keys, by hash. Raises KeyFileError naming the line on anything wrong: a
    server must not start with a key silently missing or silently made admin."""
    keys: dict[str, Principal] = {}
    names: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        where = f"{source} line {number}"
        if len(words) not in (2, 3):
            raise KeyFileError(f"{where}: expected `name sha256-of-key [admin]`, found {len(words)} words; "
                               "`vllama key new NAME` prints a line to add")
        name, digest, *flag = words
        if not NAME.fullmatch(name):
            raise KeyFileError(f"{where}: the name {name!r} is not 1-64 letters, digits, '.', '_' or '-' "
                               "(starting with a letter or digit)")
        if not HEX64.fullmatch(digest.lower()):
            raise KeyFileError(f"{where}: the second word must be the key's SHA-256 as 64 hex digits, not the "
                               "key itself; `vllama key new NAME` prints a line to add")
        if flag and flag[0] != "admin":
            raise KeyFileError(f"{where}: the third word may only be `admin`, not {flag[0]!r}")
        if name in names:
            raise KeyFileError(f"{where}: the name {name!r} is already used on line {names[name]}; "
                               "give each key its own name")
        if digest.lower() in keys:
            raise KeyFileError(f"{where}: this key is already listed (as {keys[digest.lower()].name!r}); "
                               "each key needs its own line")
        names[name] = number
        keys[digest.lower()] = Principal(name=name, admin=bool(flag))
    return keys


def load_keys(path: Path | None, single_key: str = "") -> dict[str, Principal]:
    """Every key the server accepts, by hash: the file's (VLLAMA_API_KEYS) and VLLAMA_API_KEY,
    an admin key named "admin". Empty: no keys, requests need none."""
    keys: dict[str, Principal] = {}
    if path is not None:
        source = f"VLLAMA_API_KEYS file {path}"
        try:
            text = Path(path).expanduser().read_text()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
            raise KeyFileError(f"cannot read the {source} ({why}); point VLLAMA_API_KEYS at a readable file "
                               "of `name sha256-of-key [admin]` lines") from None
        keys = parse_key_file(text, source)
        if not keys:
            raise KeyFileError(f"the {source} has no keys, so no request could be served; add a line "
                               "(`vllama key new NAME` prints one) or unset VLLAMA_API_KEYS")
    if single_key:
        digest = hash_key(single_key)
        if any(p.name == SINGLE_KEY_NAME for p in keys.values()):
            raise KeyFileError(f"VLLAMA_API_KEY is the key named {SINGLE_KEY_NAME!r}, and the keys file has a key "
                               "by that name too; rename that line or unset VLLAMA_API_KEY")
        if digest in keys:
            raise KeyFileError(f"VLLAMA_API_KEY is also in the keys file (as {keys[digest].name!r}); keep it in "
                               "one place")
        keys[digest] = Principal(name=SINGLE_KEY_NAME, admin=True)
    return keys
