"""How many programs one Triton launch takes, and launching one program per row beyond it."""

from __future__ import annotations

from collections.abc import Iterator

# A launch's first grid dimension takes at most 2^31 - 1 programs (CUDA's limit; Triton's launcher
# passes it as a 32-bit int). The kernels with one program per row (softmax, LayerNorm forward) take
# their first row as an argument and are launched once per chunk of this many rows, so a tensor of
# 2^31 rows or more (4 GiB of 16-bit rows of width 1 upwards: within an H100's memory) runs in a few
# launches instead of failing to launch. A power of two, so that a chunk's first row keeps the
# divisibility Triton specialises integer arguments on, and only the rare row counts past 2^31 see a
# second specialisation (a 64-bit first row).
ROW_CHUNK = 2**30
MAX_GRID = 2**31 - 1


def row_chunks(rows: int) -> Iterator[tuple[int, int]]:
    """(first row, rows) of each launch covering ``rows`` rows, one program per row."""
    chunk = ROW_CHUNK
    for first in range(0, rows, chunk):
        yield first, min(chunk, rows - first)


# Host-side sizes of a launch. Triton's triton.cdiv and triton.next_power_of_2 are constexpr
# functions, whose every call from Python unwraps its arguments (a few microseconds each in Triton
# 3.8; a launch computes several): these plain-int twins keep that off each call's host time.
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints a >= 0, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def partial_tiles(length: int, blocks) -> bool:
    """Whether a tile of any of ``blocks`` (the sizes along one dim of every config a launch may get:
    the autotuner picks one after the kernel's bounds flag is fixed) may reach past ``length``: true
    unless each of them divides it. Where none may, a kernel leaves that dim's bounds out of its loads."""
    return any(length % block for block in blocks)
