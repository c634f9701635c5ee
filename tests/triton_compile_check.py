"""Compiles every Triton kernel of the package for a CUDA architecture, on a machine without a GPU.

The interpreter (``TRITON_INTERPRET=1``, how the CPU tests run the kernels) is far more lenient
than the compiler: type mismatches, launch-argument mistakes and shared-memory overflows only
show when Triton lowers a kernel to PTX and ptxas assembles it. This script drives the public ops
(forward and backward, ``backend="triton"``) on CPU tensors through Triton's real JIT path with a
stand-in driver that reports a CUDA target (``--arch``, e.g. 90 for H100, 80 for A100) and
compiles each launch instead of running it: every kernel the ops launch, for every
specialisation those calls produce and every autotune config (``--first-config``: only the one
chosen with autotuning off), goes through the full pipeline down to a cubin. Nothing executes,
so the tensors' contents are meaningless. It reports each kernel's shared memory against the
architecture's per-block limit: a launch none of whose configs fits (with ``--first-config``:
whose chosen config does not fit) is an error, and so is a kernel compiled without floating-point
contraction (Triton's default is turned off here, so a launch that does not pass the package's
``LAUNCH_OPTIONS`` shows), and so is a kernel of ``ROUNDED_PRODUCTS`` whose PTX has no explicitly
rounded product (``mul.rn.f32``), which contraction could otherwise fuse into an FMA.

    python tests/triton_compile_check.py --arch 80,90 --first-config   # every case, chosen configs
    python tests/triton_compile_check.py --arch 80,90 --quick          # a few cases, every config
    python tests/triton_compile_check.py --arch 90 --quick --first-config

Exit status 0 when everything compiled and fits, 1 otherwise. tests/test_triton_compile.py runs
the last form; it needs Triton's NVIDIA backend (ptxas ships with the triton wheel), not a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

# Kernels with a product that contraction must not fuse into an FMA (fused_attn/kernels/triton/_rounding.py),
# which their PTX then shows as an explicitly rounded mul.rn.f32; with the test of a launch's constexpr
# arguments that says whether it has such a product.
ROUNDED_PRODUCTS = {name: ("the scaled scores", lambda flags: not flags.get("RAW_SCORES", False)) for name in (
    "_attn_fwd_kernel", "_attn_bwd_stats_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")}  # raw: unscaled
ROUNDED_PRODUCTS["_norm_bwd_kernel"] = ("g = dy * w", lambda flags: flags.get("HAS_WEIGHT", True))  # g = dy without

# Per-block shared memory (opt-in maximum) by compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def _install_compile_only_runtime(arch: int, records: list[dict]) -> None:
    """Triton's launch path with a driver that names a CUDA target, compiling instead of launching."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    class DeviceUtils:
        @staticmethod
        def get_device_properties(device):
            return {"max_shared_mem": SHARED_LIMIT[arch]}

    class CompileOnlyDriver:
        target = GPUTarget("cuda", arch, 32)
        utils = DeviceUtils()

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return self.target

        def is_active(self):
            return True

    jit_run = JITFunction.run
    state = {"autotuning": False, "launch": 0}

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        # main() turns Triton's default off: only a launch passing LAUNCH_OPTIONS compiles with contraction.
        state["name"], state["shared"], state["fused"] = (
            self.fn.__name__, kernel.metadata.shared, kernel.metadata.enable_fp_fusion)
        state["rounded"] = "mul.rn.f32" in kernel.asm["ptx"]
        product = ROUNDED_PRODUCTS.get(self.fn.__name__)
        state["to_round"] = product is not None and bool(product[1](kwargs))
        if not state["autotuning"]:
            state["launch"] += 1
            records.append({"kernel": self.fn.__name__, "shared": kernel.metadata.shared, "launch": state["launch"],
                            "config": "-", "fused": state["fused"], "rounded": state["rounded"],
                            "to_round": state["to_round"]})
        return kernel

    def every_config(self, *args, grid, warmup, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        state["autotuning"] = True
        state["launch"] += 1
        try:
            # The kernel's own pruning, as at a launch: with autotuning off it keeps the one config used.
            for config in self.prune_configs({"grid": grid, "warmup": warmup, **kwargs}):
                self.fn.run(*args, grid=grid, warmup=True, **kwargs, **config.all_kwargs())
                records.append({"kernel": state["name"], "shared": state["shared"], "launch": state["launch"],
                                "config": str(config), "fused": state["fused"], "rounded": state["rounded"],
                                "to_round": state["to_round"]})
        finally:
            state["autotuning"] = False
            self.nargs = None

    JITFunction.run = compile_only
    Autotuner.run = every_config
    driver.set_active(CompileOnlyDriver())
    assert triton.__version__


def _cases(quick: bool):
    """(name, callable) pairs driving the public ops forward and backward with backend="triton"."""
    import torch

    import fused_attn
    from fused_attn.ops.add_layer_norm import add_layer_norm_keep_mask
    from fused_attn.ops.attention import attention_with_keep_mask
    from fused_attn.ops.ffn import ffn_keep_mask, linear_activation

    def t(*shape, dtype, grad=True):
        return torch.randn(*shape, dtype=dtype).requires_grad_(grad)

    def backward(out, *inputs):
        inputs = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
        torch.autograd.grad(out, inputs, torch.ones_like(out))

    def attention(dtype, head_dim=64, q_len=128, k_len=None, mask=None, causal=False, dropout=0.0, mask_grad=False,
                  kv_heads=4):
        def run():
            k_len_ = q_len if k_len is None else k_len
            q = t(2, 4, q_len, head_dim, dtype=dtype)
            k, v = t(2, kv_heads, k_len_, head_dim, dtype=dtype), t(2, kv_heads, k_len_, head_dim, dtype=dtype)
            m = None
            if mask == "padding":
                m = torch.ones(2, 1, 1, k_len_, dtype=torch.bool)
            elif mask == "bias":
                m = t(1, 4, q_len, k_len_, dtype=dtype, grad=mask_grad)
            out = fused_attn.scaled_dot_product_attention(
                q, k, v, m, dropout_p=dropout, is_causal=causal, enable_gqa=kv_heads != 4, backend="triton"
            )
            backward(out, q, k, v, m)

        return run

    def softmax(dtype, mask=None, causal=False):
        def run():
            x = t(2, 4, 77, 300, dtype=dtype)
            m = None
            if mask == "bool":
                m = torch.ones(2, 1, 1, 300, dtype=torch.bool)
            elif mask == "bias":
                m = t(1, 4, 77, 300, dtype=dtype)
            backward(fused_attn.softmax(x, mask=m, scale=0.5, is_causal=causal, backend="triton"), x, m)

        return run

    def layer_norm(dtype, hidden, affine=True):
        def run():
            x = t(64, hidden, dtype=dtype)
            w, b = (t(hidden, dtype=dtype), t(hidden, dtype=dtype)) if affine else (None, None)
            backward(fused_attn.layer_norm(x, (hidden,), w, b, backend="triton"), x, w, b)

        return run

    def add_layer_norm(dtype, hidden=768, dropout=0.0, input_bias=True, prenorm=False):
        def run():
            x, r = t(64, hidden, dtype=dtype), t(64, hidden, dtype=dtype)
            w, b = t(hidden, dtype=dtype), t(hidden, dtype=dtype)
            ib = t(hidden, dtype=dtype) if input_bias else None
            out = fused_attn.add_layer_norm(
                x, r, w, b, dropout_p=dropout, input_bias=ib, return_prenorm=prenorm, backend="triton"
            )
            out = out[0] + out[1] if prenorm else out
            backward(out, x, r, w, b, ib)

        return run

    def linear_gelu(dtype, bias=True, approximate="none", rows=256, in_features=192):
        # approximate: the kernels' activation code, the GELU's ("none", "tanh") or ReLU's ("relu",
        # which the public linear_gelu refuses: the op behind it, linear_activation).
        op = linear_activation if approximate == "relu" else fused_attn.linear_gelu

        def run():
            x, w = t(rows, in_features, dtype=dtype), t(384, in_features, dtype=dtype)
            b = t(384, dtype=dtype) if bias else None
            backward(op(x, w, b, approximate, backend="triton"), x, w, b)

        return run

    def ffn(dtype, dropout=0.0, activation="gelu"):
        def run():
            x, w1, b1 = t(256, 192, dtype=dtype), t(768, 192, dtype=dtype), t(768, dtype=dtype)
            w2, b2 = t(192, 768, dtype=dtype), t(192, dtype=dtype)
            out = fused_attn.ffn(x, w1, b1, w2, b2, dropout_p=dropout, activation=activation, backend="triton")
            backward(out, x, w1, b1, w2, b2)

        return run

    def inference(dtype, activation="gelu", norms=True):
        # The inference forms (no gradient): the GEMM epilogue without its pre-activation store, the
        # Add & Norm forward with its sum in registers (one block) or streamed through the output.
        def run():
            x, w1, b1, w2, b2 = (t(*shape, dtype=dtype, grad=False) for shape in ((256, 192), (768, 192), (768,),
                                                                                  (192, 768), (192,)))
            fused_attn.ffn(x, w1, b1, w2, b2, activation=activation, backend="triton")
            for hidden in (768, 40000) if norms else ():
                r = t(64, hidden, dtype=dtype, grad=False)
                fused_attn.add_layer_norm(r, r, None, None, backend="triton")

        return run

    def keep_masks():
        q = torch.randn(1, 2, 64, 32)
        attention_with_keep_mask(q, q, q, dropout_p=0.2)
        ffn_keep_mask(64, 96, 0.2, "cpu", "triton")
        add_layer_norm_keep_mask((64, 96), 0.2, "cpu")

    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    cases = [
        ("attention bf16 d64", attention(bf16)),
        ("attention bf16 d128 causal", attention(bf16, head_dim=128, causal=True)),
        ("attention fp16 d64 bias-grad", attention(f16, mask="bias", mask_grad=True)),
        # a key padding mask: the kernels walk only the key tiles it leaves (KEY_RANGE)
        ("attention bf16 d64 padding causal grouped", attention(bf16, mask="padding", causal=True, kv_heads=2)),
        ("attention fp16 d64 causal dropout", attention(f16, causal=True, dropout=0.1)),
        ("attention fp32 d64", attention(f32)),
        ("attention bf16 d64 grouped", attention(bf16, kv_heads=2)),
        # one key/value head at 64 keys: the dK/dV kernel splits the group (_dkdv_splits)
        ("attention fp16 d64 grouped split causal", attention(f16, q_len=64, kv_heads=1, causal=True)),
        ("softmax fp16 bool-mask", softmax(f16, mask="bool")),
        ("layer_norm bf16 768", layer_norm(bf16, 768)),
        ("add_layer_norm bf16 dropout", add_layer_norm(bf16, dropout=0.1)),
        ("linear_gelu bf16", linear_gelu(bf16)),
        # K of the forward (200) and of the weight gradient (250 rows) leave a partial K tile (K_BOUNDS)
        ("linear_gelu fp16 partial K tiles", linear_gelu(f16, rows=250, in_features=200)),
        ("ffn bf16 dropout", ffn(bf16, dropout=0.1)),
        ("inference bf16", inference(bf16)),
        # ReLU (the activation code "relu"): the A prologue's relu' (linear backward), the B
        # prologue's relu (dW2) and the dGELU epilogue's relu' beside the dropout prologue.
        ("linear_gelu fp16 relu partial K tiles", linear_gelu(f16, approximate="relu", rows=250, in_features=200)),
        ("ffn bf16 relu dropout", ffn(bf16, dropout=0.1, activation="relu")),
        ("inference bf16 relu", inference(bf16, activation="relu", norms=False)),
    ]
    if quick:
        return cases
    for dtype, name in ((f16, "fp16"), (bf16, "bf16"), (f32, "fp32")):
        cases += [
            (f"attention {name} d64 padding", attention(dtype, mask="padding")),
            (f"attention {name} d128 bias", attention(dtype, head_dim=128, mask="bias")),
            (f"attention {name} d128 bias-grad causal",
             attention(dtype, head_dim=128, mask="bias", mask_grad=True, causal=True)),
            (f"attention {name} d256", attention(dtype, head_dim=256)),
            (f"attention {name} d256 causal dropout",
             attention(dtype, head_dim=256, causal=True, dropout=0.1)),
            (f"attention {name} d40 cross 77x200 padding",
             attention(dtype, head_dim=40, q_len=77, k_len=200, mask="padding")),
            (f"attention {name} d16 len 1", attention(dtype, head_dim=16, q_len=1)),
            (f"attention {name} d32 causal 1000", attention(dtype, head_dim=32, q_len=1000, causal=True)),
            (f"softmax {name}", softmax(dtype)),
            (f"softmax {name} bias causal", softmax(dtype, mask="bias", causal=True)),
            (f"layer_norm {name} 1024", layer_norm(dtype, 1024)),
            (f"layer_norm {name} 16384 no-affine", layer_norm(dtype, 16384, affine=False)),
            (f"add_layer_norm {name} prenorm", add_layer_norm(dtype, hidden=1000, prenorm=True)),
            (f"add_layer_norm {name} no input bias dropout",
             add_layer_norm(dtype, hidden=4096, input_bias=False, dropout=0.2)),
            # Rows wider than one block: the forward streams the row three times, the backward twice.
            (f"add_layer_norm {name} 40000 streamed", add_layer_norm(dtype, hidden=40000, dropout=0.1)),
            (f"linear_gelu {name} tanh no bias", linear_gelu(dtype, bias=False, approximate="tanh")),
            (f"linear_gelu {name} relu no bias", linear_gelu(dtype, bias=False, approximate="relu")),
            (f"ffn {name}", ffn(dtype)),
            (f"ffn {name} relu", ffn(dtype, activation="relu")),
            (f"inference {name}", inference(dtype)),
            (f"inference {name} relu", inference(dtype, activation="relu", norms=False)),
        ]
    cases.append(("keep masks", keep_masks))
    return cases


def check(arch: int, quick: bool, only: str | None = None) -> int:
    import fused_attn.backends as backends

    records: list[dict] = []
    _install_compile_only_runtime(arch, records)
    # The ops take CPU tensors to Triton only under the interpreter; here they go to the compiler.
    unavailable = backends.backend_unavailable_reasons
    backends.backend_unavailable_reasons = lambda b, d: [] if b == "triton" else unavailable(b, d)

    failures = []
    start = time.time()
    for name, run in _cases(quick):
        if only is not None and only not in name:
            continue
        before = len(records)
        try:
            run()
        except Exception as exc:  # noqa: BLE001 - every failure is reported, then the run fails
            failures.append(f"{name}: {type(exc).__name__}: {exc}".splitlines()[0][:400])
            traceback.print_exc()
        print(f"  sm{arch} {name}: {len(records) - before} kernels compiled", flush=True)

    limit = SHARED_LIMIT.get(arch)
    by_kernel = defaultdict(list)
    for record in records:
        by_kernel[record["kernel"]].append(record)
    print(f"sm{arch}: {len(records)} compilations in {time.time() - start:.0f} s")
    for kernel, recs in sorted(by_kernel.items()):
        over = [r for r in recs if limit is not None and r["shared"] > limit]
        print(f"  {kernel}: {len(recs)} compiled, shared memory up to {max(r['shared'] for r in recs)} B"
              + (f", {len(over)} configs above the {limit} B limit (skipped by the autotuner)" if over else ""))
        launches = defaultdict(list)
        for r in recs:
            launches[r["launch"]].append(r)
        for configs in launches.values():
            if limit is not None and all(r["shared"] > limit for r in configs):
                needs = ", ".join(f"{r['config']}: {r['shared']} B" for r in configs)
                failures.append(f"{kernel}: no config fits sm{arch}'s {limit} B of shared memory ({needs})")
    for kernel in sorted({r["kernel"] for r in records if not r["fused"]}):
        failures.append(f"{kernel}: compiled without enable_fp_fusion (its launch does not pass LAUNCH_OPTIONS)")
    for kernel in sorted({r["kernel"] for r in records if r["to_round"] and not r["rounded"]}):
        failures.append(f"{kernel}: no mul.rn.f32 in its PTX ({ROUNDED_PRODUCTS[kernel][0]}: a product to round on "
                        "its own, fused_attn/kernels/triton/_rounding.py)")
    for failure in failures:
        print("FAILED", failure)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="90", help="compute capabilities, e.g. 80,90")
    parser.add_argument("--quick", action="store_true", help="a few cases per op instead of the whole list")
    parser.add_argument("--first-config", action="store_true",
                        help="only the config each launch uses with autotuning off")
    parser.add_argument("--only", help="the cases whose name contains this text")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("run without TRITON_INTERPRET=1: this checks the compiler, not the interpreter")
    if args.first_config:
        os.environ["FUSED_ATTN_TRITON_AUTOTUNE"] = "0"
    # Every launch asks for its compiler options (fused_attn/kernels/triton/_options.py); with
    # Triton's own default turned off, one that does not shows as compiled without contraction.
    os.environ["TRITON_DEFAULT_FP_FUSION"] = "0"
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    archs = [int(a) for a in args.arch.split(",")]
    if len(archs) > 1:  # one architecture per process: Triton caches the target per kernel
        import subprocess

        flags = (["--quick"] if args.quick else []) + (["--first-config"] if args.first_config else [])
        flags += ["--only", args.only] if args.only else []
        codes = [subprocess.call([sys.executable, __file__, "--arch", str(a), *flags]) for a in archs]
        return max(codes)
    return check(archs[0], args.quick, args.only)


if __name__ == "__main__":
    sys.exit(main())
