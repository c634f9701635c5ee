"""Plots (PNG, SVG or PDF) of ``fused-attn bench`` records and ``fused-attn profile-memory`` results (matplotlib)."""

from __future__ import annotations

from collections import defaultdict

# The shape entry each suite sweeps (the x axis); the other entries, except the batch (which a
# fixed-token sweep varies with the length), name the panel.
X_AXIS = {"attention": "seq", "softmax": "seq", "layer_norm": "hidden", "add_layer_norm": "hidden", "ffn": "tokens",
          "model": "seq"}
METRICS = [("tflops", "TFLOP/s"), ("gbps", "GB/s"), ("tokens_per_s", "tokens/s")]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        from .cli import UsageError

        raise UsageError("--plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def require_matplotlib() -> None:
    """Raises the usage error ``--plot`` gives without matplotlib: called before any work, so that
    a run is not spent only to find that its plot cannot be drawn."""
    _pyplot()


def _panels(records: list[dict]) -> dict[tuple, list[dict]]:
    panels: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if r.get("skipped"):
            continue
        x = X_AXIS.get(r["suite"])
        rest = tuple((k, v) for k, v in r["shape"].items() if k not in (x, "batch"))
        panels[(r["suite"], r["dtype"], r["mode"], rest)].append(r)
    return panels


def _title(key: tuple) -> str:
    suite, dtype, mode, rest = key
    details = " ".join(("causal" if v else "full") if isinstance(v, bool) else f"{k}={v}" for k, v in rest)
    return f"{suite} {mode} {dtype}\n{details}"


def _bars(ax_rate, ax_mem, by_impl: dict, metric: str, label: str, key: tuple) -> None:
    """A panel with a single size: one bar per implementation."""
    impls = list(by_impl)
    ax_rate.bar(impls, [by_impl[i][0][metric] for i in impls], color="tab:blue")
    ax_rate.set_ylabel(label)
    mem = [by_impl[i][0].get("peak_mem_bytes") for i in impls]
    if all(m is not None for m in mem):
        ax_mem.bar(impls, [m / 2**20 for m in mem], color="tab:gray")
    ax_mem.set_ylabel("peak memory of the call (MiB)")
    for ax in (ax_rate, ax_mem):
        ax.set_title(_title(key), fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)


def plot_bench(records: list[dict], path: str) -> None:
    """Per (suite, dtype, mode, fixed shape): the rate (or time) against the swept size per
    implementation, and the peak memory of the call next to it when it was measured."""
    plt = _pyplot()
    panels = _panels(records)
    if not panels:
        raise ValueError("no timed records to plot")
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.4 * len(panels)), squeeze=False)
    for (key, rows), (ax_rate, ax_mem) in zip(panels.items(), axes):
        x_key = X_AXIS[key[0]]
        metric, label = next(((m, lab) for m, lab in METRICS if rows[0].get(m) is not None), ("median_ms", "median ms"))
        by_impl: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            by_impl[r["impl"]].append(r)
        if len({r["shape"][x_key] for r in rows}) == 1:
            _bars(ax_rate, ax_mem, by_impl, metric, label, key)
            continue
        for impl, points in by_impl.items():
            points.sort(key=lambda r: r["shape"][x_key])
            xs = [r["shape"][x_key] for r in points]
            ax_rate.plot(xs, [r[metric] for r in points], marker="o", label=impl)
            if all(r.get("peak_mem_bytes") is not None for r in points):
                ax_mem.plot(xs, [r["peak_mem_bytes"] / 2**20 for r in points], marker="o", label=impl)
        for ax, ylabel in ((ax_rate, label), (ax_mem, "peak memory of the call (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel(x_key)
            ax.set_ylabel(ylabel)
            ax.set_title(_title(key), fontsize=9)
            ax.grid(True, alpha=0.3)
        ax_mem.set_yscale("log")
        ax_rate.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(result: dict, path: str, *, top: int = 12) -> None:
    """Peak memory plain vs fused, and the bytes each module saves for backward itself (the
    modules that save the most, in either model)."""
    plt = _pyplot()
    fig, (ax_peak, ax_mod) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 3]})
    mib = 2**20
    ax_peak.bar(["plain", "fused"], [result["plain"]["peak_bytes"] / mib, result["fused"]["peak_bytes"] / mib],
                color=["tab:gray", "tab:blue"])
    ax_peak.set_ylabel("MiB")
    ratio = result.get("ratio")
    ax_peak.set_title(f"peak ({result.get('mode', '')})" + (f"\nfused/plain = {ratio:.2f}" if ratio is not None else ""))
    saved = {label: {m["name"]: m["self_saved_bytes"] for m in result[label]["modules"]} for label in ("plain", "fused")}
    names = sorted(set(saved["plain"]) | set(saved["fused"]),
                   key=lambda n: -max(saved["plain"].get(n, 0), saved["fused"].get(n, 0)))[:top]
    names = [n for n in names if max(saved["plain"].get(n, 0), saved["fused"].get(n, 0)) > 0]
    ys = range(len(names))
    ax_mod.barh([y - 0.2 for y in ys], [saved["plain"].get(n, 0) / mib for n in names], height=0.4, label="plain",
                color="tab:gray")
    ax_mod.barh([y + 0.2 for y in ys], [saved["fused"].get(n, 0) / mib for n in names], height=0.4, label="fused",
                color="tab:blue")
    ax_mod.set_yticks(list(ys), names, fontsize=8)
    ax_mod.invert_yaxis()
    ax_mod.set_xlabel("MiB saved for backward by the module itself")
    ax_mod.legend()
    title = f"{result.get('model', '')} L={result.get('seq', '')} B={result.get('batch', '')} {result.get('dtype', '')}"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
