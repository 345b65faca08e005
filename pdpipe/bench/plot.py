"""`pdpipe bench plot compare.json`: PNGs of a comparison, one line per layout: TTFT, TPOT and ITL
(p50 solid, p99 dashed) and SLO attainment, each against the request rate. matplotlib comes with the
`bench` extra; where it is missing, compare still writes its JSON and this makes the plots later."""
from __future__ import annotations

from pathlib import Path

PANELS = (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("itl_ms", "ITL (ms)"))


def _figure(title: str, ylabel: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.set_title(title)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def plot_compare(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, label in PANELS:
        fig, ax = _figure(f"{label.split()[0]} against load", label)
        for i, (name, layout) in enumerate(result["layouts"].items()):
            rates = [p["rate"] for p in layout["points"]]
            for q, style in (("p50", "-"), ("p99", "--")):
                values = [p[key][q] if p[key][q] is not None else float("nan") for p in layout["points"]]
                ax.plot(rates, values, style, marker="o", color=f"C{i}", label=f"{name} {q}")
        paths.append(_save(fig, out / f"{key.removesuffix('_ms')}.png"))
    fig, ax = _figure(f"SLO attainment (target {result['slo_attainment'] * 100:g} %)", "requests within SLOs (%)")
    for i, (name, layout) in enumerate(result["layouts"].items()):
        ax.plot([p["rate"] for p in layout["points"]], [p["attainment"] * 100 for p in layout["points"]],
                marker="o", color=f"C{i}", label=name)
    ax.axhline(result["slo_attainment"] * 100, color="grey", linestyle=":", label="target")
    ax.set_ylim(-5, 105)
    paths.append(_save(fig, out / "attainment.png"))
    return paths


def plot_or_explain(result: dict, out: Path) -> str:
    try:
        paths = plot_compare(result, out)
    except ImportError:
        return (f"plots: matplotlib is not installed here; make them later with "
                f"`pdpipe bench plot {out / 'compare.json'}` (pip install 'pdpipe[bench]')")
    return "plots: " + " ".join(str(p) for p in paths)

