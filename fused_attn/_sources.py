"""A digest of the extension's sources, recorded by setup.py at build time and compared by
``fused_attn._extension.stale_reason`` (no imports beyond the standard library: setup.py loads
this file on its own, before the package can be imported)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sources_digest(root: Path) -> str | None:
    """sha256 over setup.py, the compile flags' module (fused_attn/_cpu_isa.py) and every file
    under csrc/ (paths and contents, in sorted order); None where ``root`` is not a source
    checkout (e.g. an installed wheel)."""
    csrc = root / "csrc"
    if not csrc.is_dir():
        return None
    digest = hashlib.sha256()
    build_files = [root / "setup.py", root / "fused_attn" / "_cpu_isa.py"]
    for path in [*build_files, *sorted(p for p in csrc.rglob("*") if p.is_file())]:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()
