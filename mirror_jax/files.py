"""Files: checksums, atomic writes, and where the project's data lives outside the package.

* `sha256_file(path)`: hex digest, streamed.
* `atomic_write_text(path, text)`: temp file in the same directory + ``os.replace``, so a reader
  never sees half a file.
* `checkpoints_dir(explicit=None)`: the directory holding trained adapters (``checkpoints/``),
  looked up in this order: the argument, ``$MIRROR_JAX_CHECKPOINTS``, the ``checkpoints/`` of the
  checkout this package was imported from (an editable install or a clone on ``sys.path``),
  ``./checkpoints``. `CheckpointsNotFoundError` names every place it looked.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

CHECKPOINTS_ENV = "MIRROR_JAX_CHECKPOINTS"


class CheckpointsNotFoundError(FileNotFoundError):
    """No checkpoints directory was found (the message lists the places searched)."""


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (parents created). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def checkpoint_search_path(explicit: str | os.PathLike | None = None) -> list[Path]:
    """The candidate checkpoints directories, in lookup order."""
    if explicit is not None:
        return [Path(explicit)]
    out = []
    if os.environ.get(CHECKPOINTS_ENV):
        out.append(Path(os.environ[CHECKPOINTS_ENV]))
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file():  # imported from a checkout (editable install / clone)
        out.append(checkout / "checkpoints")
    out.append(Path.cwd() / "checkpoints")
    return out


def checkpoints_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The first existing directory of `checkpoint_search_path`, else `CheckpointsNotFoundError`."""
    places = checkpoint_search_path(explicit)
    for p in places:
        if p.is_dir():
            return p
    raise CheckpointsNotFoundError(
        "no checkpoints directory found (looked in: " + ", ".join(str(p) for p in places) + "); pass the directory "
        f"explicitly, set {CHECKPOINTS_ENV}, or run from a checkout of mirror_jax (it ships checkpoints/)"
    )
