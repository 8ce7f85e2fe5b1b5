"""Writing a file so that readers see the old file or the whole new one, never half of it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], None], suffix: str = ".tmp") -> Path:
    """Run ``write(temporary)`` in ``path``'s folder, then rename the result to ``path``.

    The rename is atomic on one filesystem, so a job killed mid-write, or two workers writing the
    same cache at once, leave either no file or a whole one; the temporary is removed on failure.
    ``suffix`` ends the temporary's name, for writers that append their own (``np.savez``: ``.npz``).
    The file gets the umask's default mode, not ``mkstemp``'s private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(descriptor)
    temporary = Path(name)
    try:
        write(temporary)
        umask = os.umask(0)
        os.umask(umask)
        temporary.chmod(0o666 & ~umask)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
