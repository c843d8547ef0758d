"""Training curves of a run (`fastdino plot RUN_DIR`): one PNG drawn from RUN_DIR/log.jsonl.

One panel per logged quantity over optimizer steps: the loss, the four schedules (lr,
weight decay, EMA momentum, teacher temperature), throughput, the collapse monitor
(teacher and student output entropy against ln K, the entropy of a uniform output) and
k-NN accuracy from the evaluation records. Panels without data are left out.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from fastdino.eval.command import save_figure

LOG_K_STYLE = dict(color="0.35", linestyle="--", linewidth=1.2)


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    series: tuple[tuple[str, str], ...]  # (log key, legend label)
    evaluation: bool = False  # drawn from the "kind": "eval" records
    with_log_k: bool = False  # add ln K as a dashed reference line
    smooth: bool = False  # noisy per-step values: add a running mean over the raw line
    mark_warnings: bool = False  # cross the steps whose record carries collapse warnings


PANELS = (
    Panel("DINO loss", "cross-entropy (nats)", (("loss", "loss"),), with_log_k=True, smooth=True),
    Panel("learning rate", "lr", (("lr", "lr"),)),
    Panel("weight decay", "weight decay", (("wd", "wd"),)),
    Panel("teacher EMA momentum", "momentum", (("momentum", "momentum"),)),
    Panel("teacher temperature", "temperature", (("teacher_temp", "teacher temperature"),)),
    Panel("throughput", "images / s", (("img_per_s", "img/s"),), smooth=True),
    Panel("output entropy (collapse monitor)", "entropy (nats)",
          (("teacher_entropy", "teacher"), ("student_entropy", "student")), with_log_k=True, mark_warnings=True),
    Panel("k-NN accuracy (teacher)", "accuracy (%)", (("knn_top1", "top-1"), ("knn_top5", "top-5")), evaluation=True),
)


def read_log(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(training-step records, evaluation records) of RUN_DIR/log.jsonl, each sorted by step."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    log_path = run_dir / "log.jsonl"
    if not log_path.is_file():
        raise FileNotFoundError(f"no log.jsonl in {run_dir}: not a run folder, or the run has not logged a step yet")
    records = []
    for line in log_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a run killed mid-write leaves a partial last line
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    if not records:
        raise ValueError(f"{log_path} holds no records yet")
    records.sort(key=lambda r: r["step"])
    steps = [r for r in records if r.get("kind") != "eval"]
    evals = [r for r in records if r.get("kind") == "eval"]
    return steps, evals


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draws the curves of `run_dir` into `out` (default RUN_DIR/curves.png); returns the path."""
    run_dir = Path(run_dir)
    steps, evals = read_log(run_dir)
    panels = [p for p in PANELS if _series(evals if p.evaluation else steps, p.series[0][0])[0].size]
    if not panels:
        raise ValueError(f"{run_dir / 'log.jsonl'} holds none of the quantities this plot draws")
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(4.4 * columns, 3.3 * rows + 0.4), layout="constrained")
    fig.suptitle(_headline(run_dir, steps, evals), fontsize=13)
    for index, panel in enumerate(panels):
        _draw_panel(fig.add_subplot(rows, columns, index + 1), panel, evals if panel.evaluation else steps, steps)

    return save_figure(fig, Path(out) if out else run_dir / "curves.png", dpi=110)


def _draw_panel(ax, panel: Panel, records: list[dict], step_records: list[dict]) -> None:
    for color, (key, label) in zip(("C0", "C1"), panel.series):
        x, y = _series(records, key)
        if not x.size:
            continue
        if panel.evaluation:
            ax.plot(x, y, marker="o", markersize=4, color=color, label=label)
            ax.annotate(f"{y[-1]:.1f}", (x[-1], y[-1]), textcoords="offset points", xytext=(-4, 6), ha="right",
                        fontsize=8, color=color)
            ax.margins(y=0.12)  # room for the labels
        elif panel.smooth and x.size >= 50:
            ax.plot(x, y, color=color, alpha=0.3, linewidth=0.8)
            ax.plot(x, _running_mean(y, max(5, x.size // 40)), color=color, label=f"{label} (running mean)")
        else:  # dots show where the records are when there are few
            ax.plot(x, y, color=color, label=label, linewidth=1.4, marker="." if x.size < 30 else None)
    if panel.with_log_k:
        x, log_k = _series(step_records, "log_k")
        if x.size:
            ax.plot(x, log_k, label="ln K (uniform output)", **LOG_K_STYLE)
    if panel.mark_warnings:
        warned = [r for r in records if r.get("collapse_warnings")]
        if warned:
            x, y = _series(warned, panel.series[0][0])
            ax.plot(x, y, linestyle="none", marker="x", color="C3", label="collapse warning")
    ax.set_title(panel.title, fontsize=11)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, alpha=0.3)
    formatter = ScalarFormatter(useMathText=True)
    formatter.set_powerlimits((-3, 4))  # lr and wd are tiny: show them as x 10^-4, not 0.0001
    ax.yaxis.set_major_formatter(formatter)
    if len(ax.get_lines()) > 1 or panel.evaluation:
        ax.legend(fontsize=8, loc="best")


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that hold a number under `key`."""
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    if not pairs:
        return np.empty(0), np.empty(0)
    x, y = zip(*pairs)
    return np.asarray(x, dtype=float), np.asarray(y, dtype=float)


def _running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` values (fewer at the start, so the line begins at the first
    step); non-finite values (a skipped NaN step) are left out rather than poisoning the rest."""
    finite = np.isfinite(values)
    sums = np.cumsum(np.insert(np.where(finite, values, 0.0), 0, 0.0))
    counts = np.cumsum(np.insert(finite, 0, False))
    ends = np.arange(1, values.size + 1)
    starts = np.maximum(0, ends - window)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums[ends] - sums[starts]) / (counts[ends] - counts[starts])


def _headline(run_dir: Path, steps: list[dict], evals: list[dict]) -> str:
    parts = [str(run_dir.resolve().name)]
    if steps:
        last = steps[-1]
        parts.append(f"last logged step {last['step']} (epoch {last.get('epoch', '?')})")
        if isinstance(last.get("loss"), (int, float)):
            parts.append(f"loss {last['loss']:.4f}")
    knn = [r["knn_top1"] for r in evals if isinstance(r.get("knn_top1"), (int, float))]
    if knn:
        parts.append(f"k-NN top-1 {knn[-1]:.1f}%")
    return "  |  ".join(parts)
