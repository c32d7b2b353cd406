"""What every report shares: the records a report and its plots become, PNG rendering,
markdown references, and the sequence-length histogram both kinds of directory draw."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure as MplFigure

__all__ = ["Figure", "Report", "axes", "figure_markdown", "length_histogram", "to_png"]

# Roughly a text column wide at 1x; dpi 110 keeps tick labels readable in a browser and each
# PNG small enough (30-80 KB) for report.html to carry a dozen of them inline.
_SIZE_IN = (8.0, 4.2)
_DPI = 110


@dataclass(frozen=True, slots=True)
class Figure:
    """One plot of a report: its PNG, or, where the directory lacks the plot's data, the
    sentence that stands in for it.

    ``name`` is the file stem under ``figures/``; ``alt`` says what the plot shows (its alt
    text, so it must not contain square brackets, which end a markdown image's alt).
    """

    name: str
    title: str
    alt: str
    png: bytes | None = None
    missing: str = ""

    def __post_init__(self) -> None:
        if (self.png is None) == (not self.missing):
            raise ValueError(f"figure {self.name!r}: give either its png or why it is missing")
        if "[" in self.alt or "]" in self.alt:
            raise ValueError(f"figure {self.name!r}: alt text {self.alt!r} contains a bracket")

    @property
    def path(self) -> str:
        """Where the PNG lies relative to report.md."""
        return f"figures/{self.name}.png"


@dataclass(frozen=True, slots=True)
class Report:
    """A directory's report before it is written: report.md's text, whose images reference
    ``figures``, and the HTML page's title."""

    title: str
    markdown: str
    figures: list[Figure]


def axes() -> tuple[MplFigure, Axes]:
    """A figure and its one axes, drawn without pyplot: no global state, no display backend
    (the Agg canvas), so reports render on headless machines and in threads alike."""
    fig = MplFigure(figsize=_SIZE_IN, dpi=_DPI, layout="constrained")
    return fig, fig.add_subplot()


def to_png(fig: MplFigure) -> bytes:
    buf = io.BytesIO()
    # No timestamp or version in the metadata: the same data gives the same bytes.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def figure_markdown(fig: Figure) -> str:
    """A figure's subsection: its image, or the sentence saying why there is none."""
    body = f"![{fig.alt}]({fig.path})" if fig.png is not None else f"*Not drawn: {fig.missing}*"
    return f"### {fig.title}\n\n{body}\n"


def length_histogram(lengths: np.ndarray | None, *, source: str, missing: str) -> Figure:
    """Sequence lengths on log-spaced bins: a long tail shows as a tail, not a spike at 0."""
    title, name = "Sequence lengths of the training data", "lengths"
    if lengths is None or len(lengths) == 0:
        return Figure(name, title, "sequence length histogram", missing=missing)
    lengths = np.asarray(lengths)
    lo, hi = max(int(lengths.min()), 1), int(lengths.max())
    # Integer edges: log-spaced ones narrower than a token leave empty gaps between the
    # short lengths, which reads as data that is not there.
    bins = np.unique(np.round(np.geomspace(lo, hi + 1, 41)))
    fig, ax = axes()
    ax.hist(lengths, bins=bins.tolist(), color="C0", alpha=0.8)
    ax.set_xscale("log")
    median = float(np.median(lengths))
    ax.axvline(median, color="k", linestyle="--", label=f"median {median:,.0f}")
    ax.axvline(hi, color="C3", linestyle=":", label=f"max {hi:,}")
    ax.set(xlabel="sequence length (tokens, log scale)", ylabel="sequences",
           title=f"{len(lengths):,} sequences ({source})")
    ax.legend()
    alt = (f"Histogram of {len(lengths):,} sequence lengths on a log axis, median "
           f"{median:,.0f} tokens, max {hi:,} tokens")
    return Figure(name, title, alt, png=to_png(fig))
