"""Paths that come from downloaded data, kept inside the model they belong to.

A model's files name other files: an index (``model.safetensors.index.json``'s ``weight_map``)
names its shards, a Hub listing or another machine's manifest names the files to fetch. None of
that is ours: a repository on a mirror, or a store on another machine, may name ``../../x``, an
absolute path, or ship a symlink that leads out of the store. Anything that opens such a name
checks it here first, so a model can only ever read and write its own files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

# Index files (sharded checkpoints) whose ``weight_map`` values are file names in the model.
INDEX_SUFFIX = ".index.json"


def path_problem(path: object) -> str | None:
    """Why ``path`` cannot be a file's path relative to a model directory, or None when it can:
    a non-empty POSIX path made of plain names (no ``.`` or ``..``, not absolute, no
    backslash, NUL or empty part), spelled the one way it normalizes to."""
    if not isinstance(path, str) or not path:
        return "it is not a file name"
    if "\0" in path or "\\" in path:
        return "it holds a NUL or a backslash"
    if path.startswith("/"):
        return "it is an absolute path"
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "it climbs out of the model's directory, or has an empty part"
    if str(PurePosixPath(path)) != path:
        return "it is not in normal form"
    return None


def index_problems(model_dir: Path, listed: set[str] | None = None) -> list[str]:
    """What is wrong with the index files of ``model_dir``: names that are not plain relative
    paths, and (given ``listed``, the model's files) names of files the model does not have."""
    problems = []
    for index in sorted(model_dir.glob("*" + INDEX_SUFFIX)):
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            problems.append(f"{index.name} is not readable JSON")
            continue
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if weight_map is None:
            continue
        if not isinstance(weight_map, dict):
            problems.append(f"{index.name}'s weight_map is not an object")
            continue
        # Repos often ship the index of a format not fetched (pytorch_model.bin.index.json
        # beside safetensors): its names must be safe, but need not be there.
        kind = Path(index.name[: -len(INDEX_SUFFIX)]).suffix
        used = listed is not None and any(p.endswith(kind) for p in listed) if kind else listed is not None
        for name in sorted({v if isinstance(v, str) else repr(v) for v in weight_map.values()}):
            if (why := path_problem(name)) is not None:
                problems.append(f"{index.name} names the file {name[:100]!r}: {why}")
            elif used and name not in listed:
                problems.append(f"{index.name} names the file {name[:100]!r}, which the model does not have")
    return problems


def escaping_files(model_dir: Path, root: Path) -> list[str]:
    """The files of ``model_dir`` (symlinks followed) whose real path is outside ``root``, the
    store: a Hub snapshot's symlinks point into the store's own blobs, nothing else may."""
    root = root.resolve()
    out = []
    # os.walk does not follow symlinked directories: one pointing at / is one entry, not a tour.
    for folder, dirs, files in os.walk(model_dir):
        for name in sorted(dirs + files):
            path = Path(folder) / name
            if (path.is_symlink() or name in files) and not path.resolve().is_relative_to(root):
                out.append(str(path.relative_to(model_dir)))
    return sorted(out)


def model_dir_problems(model_dir: Path, root: Path, listed: set[str] | None = None) -> list[str]:
    """Everything that would let reading this model leave the store (empty: safe)."""
    problems = [f"{name} leads outside the model store" for name in escaping_files(model_dir, root)]
    return problems + index_problems(model_dir, listed)
