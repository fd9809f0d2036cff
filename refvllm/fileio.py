"""Small file helpers shared by data, training and evaluation."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through ``<name>.tmp`` and a rename, so a crash never leaves half a
    file under the final name. Makes the parent directory when missing. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def output_file_problem(option: str, value: str, suffix: str | None = None) -> str | None:
    """Why the output file ``value`` given to the command-line ``option`` cannot be written (one line), or
    None. Checked before any work, creating nothing: not a folder, ending in ``suffix`` (e.g. ".png", any case)
    when one is asked for, writable when it exists, else in a folder that exists or can be created (its nearest
    existing ancestor is a writable folder). Paths are quoted with repr, so the line stays one line."""
    if "\0" in value:
        return f"{option} {value!r} has a NUL character"
    try:
        path = Path(value).absolute()
        if path.is_dir():
            return f"{option} {value!r} is a folder; give a file path (e.g. {str(path / ('out' + (suffix or '')))!r})"
        if suffix and path.suffix.lower() != suffix:
            return f"{option} must be a {suffix} file, got {value!r}"
        if path.exists():  # overwritten in place
            return None if os.access(path, os.W_OK) else f"{option} {value!r} exists and cannot be written"
        folder = path.parent
        while not folder.exists():  # the folders the command would create
            folder = folder.parent
    except (OSError, ValueError) as e:  # a component not searchable, a NUL byte
        return f"{option} {value!r} cannot be checked: {getattr(e, 'strerror', None) or e}"
    if not folder.is_dir():
        return f"{option} {value!r} cannot be written: {str(folder)!r} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{option} {value!r} cannot be written: cannot write in {str(folder)!r}"
    return None
