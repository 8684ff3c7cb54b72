"""What ``tessera eval`` shows and writes: a table, ``eval.json`` and the plot ``eval.png``."""

from __future__ import annotations

import json
import math
from pathlib import Path

_COLUMNS = ("model", "bits/w", "perplexity", "KL vs base", "same top-1", "last word")


def _label(model: str) -> str:
    return (Path(model).name or model).removesuffix(".gguf")


def table(results, baseline: str) -> str:
    """One row per model, the baseline marked with ``*``."""
    rows = [
        (
            _label(r.model) + (" *" if r.model == baseline else ""),
            f"{r.bits_per_weight:.3f}",
            f"{r.perplexity:.4f}",
            f"{r.kl_divergence:.5f}",
            f"{r.top1_agreement:.2%}",
            "-" if not r.last_word_items else f"{r.last_word_accuracy:.1%} of {r.last_word_items}",
        )
        for r in results
    ]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(_COLUMNS)]

    def line(cells) -> str:
        first, *rest = cells
        return "  ".join(
            [first.ljust(widths[0]), *(c.rjust(w) for c, w in zip(rest, widths[1:], strict=True))]
        )

    return "\n".join([line(_COLUMNS), line("-" * w for w in widths), *(line(r) for r in rows)])


def footer(meta: dict) -> str:
    """How the figures were made, in two lines under the table."""
    return (
        f"* baseline. {meta['predictions']} predictions in {meta['windows']} windows of {meta['window']} "
        f"tokens of {meta['text']} (held-out documents); {meta['device']}, {meta['dtype']}, "
        f"{meta['seconds']:.0f} s.\nKL over the baseline's top {meta['kl_top_k']} tokens and the rest as one "
        f"outcome (mean mass of the rest: {meta['baseline_mass_outside_top_k']:.2%})."
    )


def write(folder: Path, results, meta: dict) -> None:
    """``eval.json`` (every figure and how it was made) and ``eval.png`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    doc = meta | {"models": [r.as_json() for r in results]}
    (folder / "eval.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    plot(results, meta["baseline"], folder / "eval.png")


def plot(results, baseline: str, path: Path) -> None:
    """Perplexity, KL and last-word accuracy against bits per weight, one labelled point a model."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
    from matplotlib.ticker import ScalarFormatter

    panels = [
        ("perplexity", lambda r: r.perplexity),
        (f"KL(baseline || model), baseline {_label(baseline)}", lambda r: r.kl_divergence),
        ("last-word accuracy", lambda r: r.last_word_accuracy),
    ]
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    for ax, (title, value) in zip(fig.subplots(1, len(panels)), panels, strict=True):
        for i, r in enumerate(sorted(results, key=lambda r: r.bits_per_weight)):
            y = value(r)
            if y is None or math.isnan(y):
                continue
            ax.scatter(r.bits_per_weight, y, color="tab:red" if r.model == baseline else "tab:blue")
            # labels alternate above and below, in order of size: neighbours sit close
            offset = (4, 6) if i % 2 == 0 else (4, -14)
            ax.annotate(_label(r.model), (r.bits_per_weight, y), textcoords="offset points", xytext=offset)
        ax.set_title(title)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.margins(x=0.3, y=0.1)  # room for the labels right of the points
        ax.set_xlabel("bits per weight (linear layers, log scale)")
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
