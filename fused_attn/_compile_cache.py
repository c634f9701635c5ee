"""The package's part in torch.compile's cache keys.

torch.compile's on-disk caches (Inductor's FX graphs and AOTAutograd's, under
``TORCHINDUCTOR_CACHE_DIR``) key a graph on the ops it calls, not on the code behind them: the
autograd formulas, fake kernels and Triton launchers this package registers in Python, and the
extension's kernels and C++ autograd. A graph cached under another version of the package would run
that version's backward: a changed signature fails ("expected at most 11 argument(s) but received
12"), a changed formula runs silently. At import the package therefore adds its identity to torch's
cache key tag (``torch.compiler.config.cache_key_tag``, part of every compile cache key), so that
a graph compiled with another version misses the cache and is compiled afresh. A tag the user set
(``TORCH_COMPILE_CACHE_KEY_TAG``, or the config before the import) is kept in front of it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

_PACKAGE = Path(__file__).resolve().parent


def identity(package: Path = _PACKAGE, extension_digest: str | None = None) -> str:
    """``fused_attn-<version>-<16 hex digits>``: a sha256 over the package's Python sources (paths
    and contents, in sorted order) and the digest of the extension's sources recorded when it was
    built (``extension_digest``; by default the build record's)."""
    from . import __version__, _extension

    if extension_digest is None:
        extension_digest = str(_extension.build_info().get("sources_digest"))
    digest = hashlib.sha256(extension_digest.encode() + b"\0")
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return f"fused_attn-{__version__}-{digest.hexdigest()[:16]}"


def _config():
    """torch's compiler config, or None where this torch has no cache key tag."""
    config = getattr(torch.compiler, "config", None)
    return config if hasattr(config, "cache_key_tag") else None


def current_tag() -> str | None:
    """The cache key tag in effect (None where this torch has none)."""
    config = _config()
    return None if config is None else config.cache_key_tag


def tag_compile_caches() -> str | None:
    """Adds :func:`identity` to ``torch.compiler.config.cache_key_tag`` (once) and returns the tag
    now in effect; None where this torch has no such tag."""
    config = _config()
    if config is None:
        return None
    tag = identity()
    current = config.cache_key_tag
    if tag not in current.split("+"):
        config.cache_key_tag = f"{current}+{tag}" if current else tag
    return config.cache_key_tag
