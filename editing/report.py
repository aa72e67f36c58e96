"""A Markdown report of finished runs: the final metrics side by side and every curve against the number of edits.

    python -m editing.report RUN_DIR [RUN_DIR ...] [--out DIR] [--allow-mixed-streams]

Each run directory is what a ``fit``/``validate`` run wrote: ``summary.json`` (:class:`callbacks.RunReport`) and,
where a CSV logger ran, ``csv/version_*/metrics.csv``, whose rows give the per-step curves (``val/*``, ``general/*``,
``spectral/layer_NN/kappa``, ``lyaplock/layer_NN/queue`` and ``budget_ratio``, ``routing/<kind>/routed``) against
``edits/total``. Without the CSV the curves come from the summary (``history`` and ``steps``). Runs are only compared
on the same edit stream (``protocol.stream_id``): numbers from different edits are not comparable. The plots need
matplotlib (``pip install -e ".[bench]"``), imported only when a report is drawn.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Logged keys worth a curve; everything else in metrics.csv (timings, train/*) is left out.
PLOTTED = re.compile(
    r"^(val/.+|general/.+|spectral/layer_\d+/kappa|lyaplock/layer_\d+/(queue|budget_ratio)|routing/[^/]+/routed)$"
)
# Panels in reading order (a panel is one PNG); val/* panels not listed here follow the listed ones.
PANEL_ORDER = ("efficacy", "generalization", "specificity", "locality", "fluency", "general", "perplexity")
MONITOR_PANELS = ("routed", "kappa", "lyaplock_queue", "lyaplock_budget_ratio")
TITLES = {
    "general": "general ability",
    "perplexity": "held-out perplexity",
    "routed": "share routed to the side memory",
    "kappa": "condition number kappa",
    "lyaplock_queue": "LyapLock virtual queue",
    "lyaplock_budget_ratio": "LyapLock budget ratio",
}
LOG_SCALE = {"kappa"}  # kappa spans decades as edits accumulate
PROTOCOL = ("data", "stream_id", "total_edits", "edits_per_step", "metric_family", "evaluation")  # overview columns


@dataclass
class Series:
    """One line of a plot: ``y`` against ``x`` (edits)."""

    label: str
    x: list[float]
    y: list[float]


@dataclass
class Run:
    """A finished run: its summary and its curves, ``key -> {edits: value}`` (the last value logged at an edit count
    wins, so a resumed run's repeated steps count once)."""

    path: Path
    summary: dict[str, Any]
    curves: dict[str, dict[float, float]] = field(default_factory=dict)
    label: str = ""

    @property
    def stream_id(self) -> str | None:
        return self.summary.get("protocol", {}).get("stream_id")


def load_run(run_dir: str | Path) -> Run:
    """Reads ``summary.json`` and the curves of one run directory; a directory without a summary is refused."""
    path = Path(run_dir)
    summary_path = path / "summary.json"
    if not summary_path.is_file():
        raise ValueError(f"{path}: no summary.json (not a run directory, or its run has not finished)")
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{summary_path}: not valid JSON ({err})") from err
    run = Run(path=path, summary=summary, label=path.name)
    run.curves = _curves_from_csv(path)
    for key, points in _curves_from_summary(summary).items():
        run.curves.setdefault(key, points)  # the CSV has every logged step; the summary only fills what it lacks
    return run


def _curves_from_csv(path: Path) -> dict[str, dict[float, float]]:
    """Curves from every ``csv/version_*/metrics.csv`` in version order (a resumed run continues in a new version)."""
    curves: dict[str, dict[float, float]] = {}
    versions = sorted(path.glob("csv/version_*/metrics.csv"), key=_version)
    for metrics_csv in versions:
        with metrics_csv.open(newline="") as handle:
            for row in csv.DictReader(handle):
                edits = _number(row.get("edits/total"))
                if edits is None:
                    continue  # a row that cannot be placed on the edits axis
                for key, text in row.items():
                    value = _number(text)
                    if value is not None and key and PLOTTED.match(key):
                        curves.setdefault(key, {})[edits] = value
    return curves


def _version(metrics_csv: Path) -> tuple[int, int | str]:
    """Numeric order of ``version_N`` (``version_10`` after ``version_9``); a named version after those."""
    suffix = metrics_csv.parent.name.removeprefix("version_")
    return (0, int(suffix)) if suffix.isdigit() else (1, suffix)


def _curves_from_summary(summary: dict[str, Any]) -> dict[str, dict[float, float]]:
    """Curves from ``history`` (evaluations) and ``steps`` (per-step method values, placed at the edits done)."""
    curves: dict[str, dict[float, float]] = {}
    for evaluation in summary.get("history", []):
        for name, value in evaluation.get("metrics", {}).items():
            curves.setdefault(f"val/{name}", {})[float(evaluation["edits"])] = float(value)
    protocol = summary.get("protocol", {})
    per_step, total = protocol.get("edits_per_step") or 1, protocol.get("total_edits")
    for i, step in enumerate(summary.get("steps", [])):
        edits = float(per_step * (i + 1) if total is None else min(per_step * (i + 1), total))
        for key, value in step.items():
            if PLOTTED.match(key):
                curves.setdefault(key, {})[edits] = float(value)
    return curves


def _number(text: str | None) -> float | None:
    """A CSV cell as a number; empty cells (keys not logged in that row) and text are ``None``."""
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def _panel(key: str) -> tuple[str, str]:
    """``(panel, series suffix)`` of a logged key: per-layer and per-task keys share one panel."""
    parts = key.split("/")
    if parts[0] == "val":  # val/efficacy_by_age/fifth_1: one panel, a series per group
        return parts[1], "/".join(parts[2:])
    if parts[0] == "general":
        return "general", "/".join(parts[1:])
    if parts[0] == "routing":
        return "routed", parts[1]
    layer = parts[1].replace("_", " ")  # spectral/layer_03/kappa, lyaplock/layer_03/queue
    return ("kappa" if parts[0] == "spectral" else f"lyaplock_{parts[2]}"), layer


def _panel_rank(panel: str) -> tuple[int, str]:
    """Sort key of a panel: the editing metrics first (as in the README tables), the monitors last."""
    if panel in PANEL_ORDER:
        return PANEL_ORDER.index(panel), ""
    if panel in MONITOR_PANELS:
        return len(PANEL_ORDER) + 1 + MONITOR_PANELS.index(panel), ""
    return len(PANEL_ORDER), panel


def panels(runs: Sequence[Run]) -> dict[str, list[Series]]:
    """Every panel with its series (one per run, and per layer or task), in reading order."""
    grouped: dict[str, list[Series]] = {}
    for run in runs:
        for key in sorted(run.curves):
            panel, suffix = _panel(key)
            label = " ".join(part for part in (run.label if len(runs) > 1 else "", suffix) if part)
            points = sorted(run.curves[key].items())
            grouped.setdefault(panel, []).append(Series(label, [x for x, _ in points], [y for _, y in points]))
    return {panel: grouped[panel] for panel in sorted(grouped, key=_panel_rank)}


def plot_series(series: Sequence[Series], title: str, path: Path, log_y: bool = False) -> None:
    """Draws the series into one PNG: the only plotting code, shared by every panel."""
    figure = _figure_class()(figsize=(6.4, 4.0), layout="constrained")
    ax = figure.subplots()
    for line in series:
        ax.plot(line.x, line.y, marker="o" if len(line.x) <= 30 else None, markersize=3, label=line.label or None)
    ax.set_xlabel("edits")
    ax.xaxis.get_major_locator().set_params(integer=True)  # edits are counts
    ax.set_ylabel(title)
    ax.set_title(title)
    if log_y and all(v > 0 for line in series for v in line.y):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if any(line.label for line in series):
        ax.legend(fontsize="small")
    figure.savefig(path, dpi=120)


def _figure_class() -> type:
    """matplotlib's ``Figure`` (no pyplot: no global state, no display backend), imported only to draw."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError('editing.report draws its plots with matplotlib: pip install -e ".[bench]"') from err
    return Figure


def check_streams(runs: Sequence[Run]) -> None:
    """Refuses runs on different edit streams: their metrics were measured on different edits."""
    first = runs[0]
    for run in runs[1:]:
        if run.stream_id != first.stream_id:
            raise ValueError(
                f"runs on different edit streams: {first.path} (stream {first.stream_id}) and {run.path} "
                f"(stream {run.stream_id}); pass --allow-mixed-streams to compare them anyway"
            )


def _label_runs(runs: Sequence[Run]) -> None:
    """Directory names as labels, the paths where two names clash."""
    names = [run.path.name for run in runs]
    for run in runs:
        run.label = run.path.name if names.count(run.path.name) == 1 else str(run.path)


def _format(value: Any) -> str:
    """A table cell: three decimals for scores, one for large values (perplexity), counts and text as they are."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A Markdown table, as lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_format(cell) for cell in row) + " |" for row in rows]
    return lines


def final_metrics(run: Run) -> dict[str, float]:
    """The last evaluation's metrics, the last general-ability scores, and seconds per edit step."""
    values = dict(run.summary.get("metrics", {}))
    for key, points in run.curves.items():
        if key.startswith("general/") and points:
            values[key] = points[max(points)]
    seconds = run.summary.get("timing", {}).get("seconds_per_step")
    if seconds is not None:
        values["seconds per edit step"] = seconds
    return values


def render(runs: Sequence[Run], out: Path, mixed_streams: bool = False) -> Path:
    """Writes ``report.md`` and one PNG per panel into ``out``; returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Run report", ""]
    streams = sorted({str(run.stream_id) for run in runs})
    if mixed_streams and len(streams) > 1:
        lines += [f"**Runs on different edit streams ({', '.join(streams)}): their metrics are not comparable.**", ""]
    else:
        lines += [f"Edit stream `{streams[0]}`.", ""]
    lines += _table(("run", "method", "model", *(key.replace("_", " ") for key in PROTOCOL)), map(_overview, runs))
    finals = [final_metrics(run) for run in runs]
    columns = sorted({name for values in finals for name in values}, key=_column_rank)
    lines += ["", "## Final metrics", ""]
    rows = [(run.label, *(values.get(column) for column in columns)) for run, values in zip(runs, finals)]
    lines += _table(("run", *columns), rows)
    lines += ["", "## Curves against the number of edits", ""]
    for panel, series in panels(runs).items():
        title = TITLES.get(panel, panel)
        filename = re.sub(r"[^A-Za-z0-9_.-]+", "_", panel) + ".png"
        plot_series(series, title, out / filename, log_y=panel in LOG_SCALE)
        lines += [f"### {title}", "", f"![{title}]({filename})", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines).rstrip() + "\n")
    return report


def _overview(run: Run) -> list[Any]:
    """A run's row of the overview table: what was edited and how, so readers see the runs are comparable."""
    protocol = run.summary.get("protocol", {})
    return [run.label, run.summary.get("method"), run.summary.get("model"), *(protocol.get(key) for key in PROTOCOL)]


def _column_rank(name: str) -> tuple[int, str]:
    """Sort key of a final-metrics column: panel order, general-ability tasks together, the timing last."""
    if name == "seconds per edit step":
        return len(PANEL_ORDER) + 2, name
    if name.startswith("general/"):
        return PANEL_ORDER.index("general"), name
    return _panel_rank(name)


def write_report(
    run_dirs: Sequence[str | Path], out: str | Path | None = None, allow_mixed_streams: bool = False
) -> Path:
    """Loads the runs, checks they share a stream and renders the report.

    Args:
        run_dirs: run directories (``trainer.default_root_dir`` of each run).
        out: where ``report.md`` and the PNGs go; default ``RUN_DIR/report`` for one run, ``./report`` for several.
        allow_mixed_streams: compare runs on different edit streams (the report says so at the top).
    """
    if not run_dirs:
        raise ValueError("no run directory given")
    runs = [load_run(run_dir) for run_dir in run_dirs]
    if not allow_mixed_streams:
        check_streams(runs)
    _label_runs(runs)
    target = Path(out) if out is not None else (runs[0].path / "report" if len(runs) == 1 else Path("report"))
    return render(runs, target, mixed_streams=allow_mixed_streams)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m editing.report``: bad input or a missing matplotlib is one line on stderr and exit status 2."""
    parser = argparse.ArgumentParser(prog="python -m editing.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories to report on")
    parser.add_argument("--out", type=Path, help="output directory (default: RUN_DIR/report, or ./report for several)")
    parser.add_argument("--allow-mixed-streams", action="store_true", help="compare runs on different edit streams")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.run_dirs, args.out, args.allow_mixed_streams)
    except (ValueError, ImportError) as err:  # bad input or no matplotlib: one clear line, no traceback
        parser.exit(2, f"error: {err}\n")
    sys.stdout.write(f"{report}\n")


if __name__ == "__main__":
    main()
