"""Secrets from files (the API's bearer token, etcd's user and password): the first line
of a file nobody but its owner may read, so no secret ever sits on a command line."""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["private_first_line"]


def private_first_line(path: str, option: str) -> str:
    """The first line of ``path``, surrounding blanks stripped. ValueError naming
    ``option`` if the file cannot be read or group/others may read it."""
    try:
        st = os.stat(path)
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"{option} {path}: {e}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"{option} {path}: readable by group/others (mode {stat.S_IMODE(st.st_mode):o}); "
                         "chmod 600 it")
    return (text.splitlines() or [""])[0].strip()
