"""Every tile configuration of the Triton attention kernels, timed on a GPU, beside the autotuner's pick.

The attention suite times what the autotuner chooses; this says whether it chooses well and what
each candidate of ``_FWD_TILES`` / ``_BWD_TILES`` (``fused_attn/kernels/triton/attention.py``)
gives at each shape: the forward kernel with each forward configuration pinned, and the backward
(its three kernels, statistics, dK/dV and dQ) with each backward configuration pinned in all three,
then both as the autotuner leaves them, and PyTorch's FlashAttention backend beside them. A
configuration that does not fit the device is listed as such. Times are medians of
``triton.testing.do_bench`` (CUDA events) on bfloat16 inputs.

    python benchmarks/triton_tiles.py                          # head dims 64 and 128, 512..16384
    python benchmarks/triton_tiles.py --head-dim 64 --seq 512,4096 --json tiles.json

Needs a CUDA GPU; it pins configurations by replacing each autotuned kernel's candidate list for
the duration of one measurement, as tests/test_triton_gpu_tiles.py does to check each of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOKENS = 16384  # per batch, as the attention suite: batch = TOKENS // seq
WIDTH = 2048  # heads x head dim


def _config_id(config) -> str:
    return f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']}w{config.num_warps}s{config.num_stages}"


@contextlib.contextmanager
def pinned(kernels, config):
    """The autotuned ``kernels`` with ``config`` as their only candidate (None: as they are)."""
    saved = [(kernel.configs, kernel.cache) for kernel in kernels]
    try:
        if config is not None:
            for kernel in kernels:
                kernel.configs, kernel.cache = [config], {}
        yield
    finally:
        for kernel, (configs, cache) in zip(kernels, saved):
            kernel.configs, kernel.cache = configs, cache


def chosen(kernel) -> str:
    """The configuration the autotuner chose for the last key it tuned (or its only one)."""
    if not kernel.cache:
        return "-"
    return _config_id(list(kernel.cache.values())[-1])


def study(seq: int, head_dim: int, causal: bool, bench, *, device: str = "cuda", dtype=torch.bfloat16,
          tokens: int = TOKENS, width: int = WIDTH) -> list[dict]:
    """Rows of one shape: each configuration's time (or why it did not run), the autotuned ones
    with the configurations chosen, and torch-flash's on CUDA. ``bench(fn)`` returns milliseconds."""
    from fused_attn.kernels.triton import attention as k

    heads, batch = max(1, width // head_dim), max(1, tokens // seq)
    gen = torch.Generator(device=device).manual_seed(seq + head_dim)
    q, kk, v, dout = (torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, generator=gen)
                      for _ in range(4))
    scale = head_dim ** -0.5
    fwd_flops = 4 * batch * heads * seq * seq * head_dim / (2 if causal else 1)
    shape = {"batch": batch, "heads": heads, "seq": seq, "head_dim": head_dim, "causal": causal}
    rows = []

    def fwd():
        return k.attention_fwd(q, kk, v, None, scale, causal, 0.0, 0)

    def row(stage, config, fn, flops):
        try:
            ms = bench(fn)
        except Exception as exc:  # a configuration that does not fit (OutOfResources) or cannot compile
            rows.append({**shape, "stage": stage, "config": config, "skipped": f"{type(exc).__name__}: {exc}"[:200]})
            return
        rows.append({**shape, "stage": stage, "config": config, "ms": ms, "tflops": flops / ms * 1e-9})

    bwd_kernels = (k._attn_bwd_stats_kernel, k._attn_bwd_dkdv_kernel, k._attn_bwd_dq_kernel)
    # As the autotuner leaves them: the forward, then the backward from its statistics.
    row("fwd", "autotuned", fwd, fwd_flops)
    rows[-1]["chosen"] = chosen(k._attn_fwd_kernel)
    out, stats, _ = fwd()

    def bwd():
        return k.attention_bwd(dout, q, kk, v, None, stats, scale, causal, 0.0, 0, False)

    row("bwd", "autotuned", bwd, 2.5 * fwd_flops)
    rows[-1]["chosen"] = "/".join(chosen(kernel) for kernel in bwd_kernels)
    for stage, kernels, fn, flops in (("fwd", [k._attn_fwd_kernel], fwd, fwd_flops),
                                      ("bwd", bwd_kernels, bwd, 2.5 * fwd_flops)):
        # The configurations the kernels' pruning keeps for this head dim (the wide ones above 128).
        for config in k._tiles_for_head_dim(k._configs(stage, interpret=False),
                                            {"BLOCK_D": k._block_dim(head_dim), "BLOCK_DV": k._block_dim(head_dim)}):
            with pinned(kernels, config):
                row(stage, _config_id(config), fn, flops)
    if device != "cuda":
        return rows
    # PyTorch's FlashAttention backend on the same inputs.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    qg, kg, vg = (t.detach().requires_grad_() for t in (q, kk, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        row("fwd", "torch-flash", lambda: sdpa(q, kk, v, is_causal=causal), fwd_flops)
        flash_out = sdpa(qg, kg, vg, is_causal=causal)
        row("bwd", "torch-flash", lambda: torch.autograd.grad(flash_out, (qg, kg, vg), dout, retain_graph=True),
            2.5 * fwd_flops)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", default="512,2048,16384", help="comma-separated sequence lengths")
    parser.add_argument("--head-dim", default="64,128", help="comma-separated head dims")
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    parser.add_argument("--json", default=None, help="write the rows to this path")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("triton_tiles: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton.testing

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    rows = []
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    for head_dim in (int(d) for d in args.head_dim.split(",")):
        for causal in causals:
            for seq in (int(s) for s in args.seq.split(",")):
                rows += study(seq, head_dim, causal, bench)
                torch.cuda.empty_cache()
    print(f"{'head_dim':>8} {'causal':>6} {'seq':>6} {'stage':>5} {'config':>14} {'ms':>9} {'TFLOP/s':>8}  chosen")
    for r in rows:
        timing = f"{r['ms']:9.3f} {r['tflops']:8.1f}" if "ms" in r else f"{'-':>9} {'-':>8}  {r['skipped'][:60]}"
        print(f"{r['head_dim']:>8} {str(r['causal']):>6} {r['seq']:>6} {r['stage']:>5} {r['config']:>14} {timing}"
              f"  {r.get('chosen', '')}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
