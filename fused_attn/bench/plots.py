"""Plots (PNG, SVG or PDF) of ``fused-attn bench`` records and ``fused-attn profile-memory`` results (matplotlib)."""

from __future__ import annotations

from collections import defaultdict

# The shape entry each suite sweeps (the x axis); the other entries, except the batch (which a
# fixed-token sweep varies with the length), name the panel.
X_AXIS = {"attention": "seq", "softmax": "seq", "layer_norm": "hidden", "add_layer_norm": "hidden", "ffn": "tokens",
          "model": "seq"}
METRICS = [("tflops", "TFLOP/s"), ("gbps", "GB/s"), ("tokens_per_s", "tokens/s")]
# Line styles per implementation: a colour, a marker and a dash pattern each, so that two
# implementations with equal values (eager and reference allocate the same score matrix) stay
# visible as two lines instead of one hiding the other.
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
_DASHES = ["-", "--", "-.", ":"]


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


def _styles(records: list[dict]) -> dict[str, dict]:
    """One style per implementation, the same in every panel of a figure: hollow markers and line
    widths that shrink from one implementation to the next, the smaller drawn over the larger, so
    that of two equal lines both stay in sight."""
    impls = list(dict.fromkeys(r["impl"] for r in records if not r.get("skipped")))
    return {impl: {"color": f"C{i % 10}", "marker": _MARKERS[i % len(_MARKERS)], "markerfacecolor": "none",
                   "linestyle": _DASHES[i % len(_DASHES)], "markersize": 10 - 2 * (i % 4),
                   "linewidth": 2.6 - 0.5 * (i % 4), "markeredgewidth": 1.5, "zorder": 2 + 0.1 * (i % 4)}
            for i, impl in enumerate(impls)}


def _title(key: tuple) -> str:
    suite, dtype, mode, rest = key
    details = " ".join(("causal" if v else "full") if isinstance(v, bool) else f"{k}={v}" for k, v in rest)
    return f"{suite} {mode} {dtype}\n{details}"


def _bars(ax_rate, ax_mem, by_impl: dict, metric: str, label: str, key: tuple, size: str) -> None:
    """A panel with a single size (``size`` names it: the swept entry and the batch): one bar per
    implementation."""
    impls = list(by_impl)
    ax_rate.bar(impls, [by_impl[i][0][metric] for i in impls], color="tab:blue")
    ax_rate.set_ylabel(label)
    mem = [by_impl[i][0].get("peak_mem_bytes") for i in impls]
    if all(m is not None for m in mem):
        ax_mem.bar(impls, [m / 2**20 for m in mem], color="tab:gray")
    ax_mem.set_ylabel("peak memory of the call (MiB)")
    for ax in (ax_rate, ax_mem):
        ax.set_title(f"{_title(key)} {size}", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)


def plot_bench(records: list[dict], path: str) -> None:
    """Per (suite, dtype, mode, fixed shape): the rate (or time) against the swept size per
    implementation, and the peak memory of the call next to it when it was measured."""
    plt = _pyplot()
    panels = _panels(records)
    if not panels:
        raise ValueError("no timed records to plot")
    styles = _styles(records)
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.4 * len(panels)), squeeze=False)
    for (key, rows), (ax_rate, ax_mem) in zip(panels.items(), axes):
        x_key = X_AXIS[key[0]]
        metric, label = next(((m, lab) for m, lab in METRICS if rows[0].get(m) is not None), ("median_ms", "median ms"))
        by_impl: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            by_impl[r["impl"]].append(r)
        if len({r["shape"][x_key] for r in rows}) == 1:
            size = " ".join(f"{k}={rows[0]['shape'][k]}" for k in (x_key, "batch") if k in rows[0]["shape"])
            _bars(ax_rate, ax_mem, by_impl, metric, label, key, size)
            continue
        for impl, points in by_impl.items():
            points.sort(key=lambda r: r["shape"][x_key])
            xs = [r["shape"][x_key] for r in points]
            ax_rate.plot(xs, [r[metric] for r in points], label=impl, **styles[impl])
            if all(r.get("peak_mem_bytes") is not None for r in points):
                ax_mem.plot(xs, [r["peak_mem_bytes"] / 2**20 for r in points], label=impl, **styles[impl])
        for ax, ylabel in ((ax_rate, label), (ax_mem, "peak memory of the call (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel(x_key)
            ax.set_ylabel(ylabel)
            ax.set_title(_title(key), fontsize=9)
            ax.grid(True, alpha=0.3)
        ax_mem.set_yscale("log")
        ax_rate.legend(fontsize=8)
        if ax_mem.lines:
            ax_mem.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(result: dict, path: str, *, top: int = 12) -> None:
    """Left: plain against fused, with fused/plain over each pair: the step's peak and, in
    training, the forward's peak and the bytes saved for backward. Right: per module (those with
    the most, in either model), the bytes saved for backward by the module itself in training, or
    in inference, where nothing is saved, the bytes of its forward still live when it returns."""
    plt = _pyplot()
    fig, (ax_peak, ax_mod) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [2, 3]})
    mib = 2**20
    training = result.get("mode") == "fwd+bwd"
    # Two-line labels: three one-line ones run into each other under the narrow panel.
    totals = [("peak of\nthe step", "peak_bytes", "ratio"), ("forward\npeak", "forward_peak_bytes", "forward_ratio"),
              ("saved for\nbackward", "saved_bytes", "saved_ratio")] if training else [("peak", "peak_bytes", "ratio")]
    xs = range(len(totals))
    for offset, label, color in ((-0.2, "plain", "tab:gray"), (0.2, "fused", "tab:blue")):
        ax_peak.bar([x + offset for x in xs], [result[label][key] / mib for _, key, _ in totals], width=0.4,
                    label=label, color=color)
    for x, (_, key, ratio_key) in zip(xs, totals):
        ratio = result.get(ratio_key)
        if ratio is not None:
            top_mib = max(result["plain"][key], result["fused"][key]) / mib
            ax_peak.annotate(f"{ratio:.2f}x", (x, top_mib), ha="center", va="bottom", fontsize=9)
    ax_peak.set_xticks(list(xs), [name for name, _, _ in totals], fontsize=9)
    ax_peak.set_ylabel("MiB")
    ax_peak.set_title(f"{result.get('mode', '')}: fused/plain over each pair", fontsize=10)
    ax_peak.set_xlim(-0.75, len(totals) - 0.25)
    ax_peak.margins(y=0.15)
    ax_peak.legend(fontsize=8)
    key, what = (("self_saved_bytes", "MiB saved for backward by the module itself") if training else
                 ("activation_bytes", "MiB of the module's forward still live when it returns"))
    per = {label: {m["name"]: m[key] for m in result[label]["modules"] if m["name"] != "(model)"}
           for label in ("plain", "fused")}
    names = sorted(set(per["plain"]) | set(per["fused"]),
                   key=lambda n: -max(per["plain"].get(n, 0), per["fused"].get(n, 0)))[:top]
    names = [n for n in names if max(per["plain"].get(n, 0), per["fused"].get(n, 0)) > 0]
    if names:
        ys = range(len(names))
        for offset, label, color in ((-0.2, "plain", "tab:gray"), (0.2, "fused", "tab:blue")):
            ax_mod.barh([y + offset for y in ys], [per[label].get(n, 0) / mib for n in names], height=0.4,
                        label=label, color=color)
        ax_mod.set_yticks(list(ys), names, fontsize=8)
        ax_mod.invert_yaxis()
        ax_mod.legend(fontsize=8)
    else:
        ax_mod.text(0.5, 0.5, "no module holds any", ha="center", va="center", transform=ax_mod.transAxes)
        ax_mod.set_yticks([])
    ax_mod.set_xlabel(what)
    title = (f"{result.get('model', '')}, {result.get('layers', '')} layer(s), seq {result.get('seq', '')}, "
             f"batch {result.get('batch', '')}, {result.get('dtype', '')}, {result.get('device', '')}")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
