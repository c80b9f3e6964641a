"""Output files that are either complete or absent: a writer fills a temporary file in the target's folder, which
then replaces the target in one step (`os.replace`); a failed write (disk full, permission, an exception in the
writer) removes the temporary file and leaves no partial output. Also the up-front checks of an output location
(not a folder, no file in the way of its folders, writable), so a command fails before it does any work."""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from difflab.errors import DifflabError


def os_error_message(err: OSError, path: Path) -> str:
    """One line saying what went wrong writing `path` and what to do."""
    if err.errno == errno.ENOSPC:
        return f"no space left on the device writing '{path}' (nothing was written); free space or write elsewhere"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write '{path}' ({os.strerror(err.errno)}); choose a location you can write to"
    return f"cannot write '{path}': {err.strerror or err}"


def temporary_path(path: Path) -> Path:
    """A fresh hidden name next to `path` with the same suffix (writers that infer the format from it still do)."""
    return path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path` (parent folders created); when the block ends, the temporary file
    replaces `path`. If the block raises, the temporary file is removed; an OSError becomes a one-line DifflabError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DifflabError(os_error_message(err, path)) from None
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise DifflabError(os_error_message(err, path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through `atomic_output`: the file is either the whole text or what it was before."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def existing_ancestor(folder: Path, target: Path | None = None) -> Path:
    """The nearest of `folder` and its parents that exists (where the rest will be created); a DifflabError if it is
    a file, which stands where a folder of `target` must be."""
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise DifflabError(f"cannot create '{target or folder}': '{parent}' is a file, not a folder")
            return parent
    return Path.cwd()


def check_writable_file(path: str | Path, flag: str) -> Path:
    """Before any work: `path` (given as `flag`) is not a folder, no file stands where a folder of it must be, and
    its folder (or the nearest one that exists, where the rest will be created) is writable."""
    path = Path(path)
    if path.is_dir():
        raise DifflabError(f"{flag} '{path}' is a folder; give a file name in it, e.g. '{path / 'samples.png'}'")
    folder = existing_ancestor(path.parent, path)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DifflabError(f"cannot write to '{folder}' (permission denied or read-only); choose another {flag}")
    return path


def check_writable_folder(folder: str | Path, flag: str) -> Path:
    """Before any work: `folder` (given as `flag`) is a folder or can be created, and can be written to."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DifflabError(f"{flag} '{folder}' is a file; give a folder")
    existing = existing_ancestor(folder)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DifflabError(f"cannot write to '{existing}' (permission denied or read-only); choose another {flag}")
    return folder
