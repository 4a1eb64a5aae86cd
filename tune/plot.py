"""sweep.png: the trials of a sweep on validation accuracy against the interpretability axis, the Pareto front, the
chosen trial, and the trials that did not finish (stopped by ASHA or interrupted; failed), each marked as such.

Drawn with matplotlib's object API (no pyplot state, no display needed), beside trials.csv. Both axes are the
validation metrics the sweep decided on (tune.results); test metrics are not drawn.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import blended_transform_factory

from tune.results import ACCURACY, Objective, TrialRow
from tune.trial import SCHEDULER_METRIC

_FRONT, _OTHER, _CHOSEN, _STOPPED, _FAILED = "#1f77b4", "#9a9a9a", "#d62728", "#ff7f0e", "#222222"


def _short(trial_id: str) -> str:
    """Tune's ids are '<experiment hash>_<index>': the index tells trials of one sweep apart."""
    return trial_id.rsplit("_", 1)[-1].lstrip("0") or "0"


def _label(ax, points: dict[tuple[float, float], list[str]], color: str) -> None:
    """One label per drawn point, naming every trial on it (equal results share a point)."""
    for (x, y), ids in points.items():
        ax.annotate(",".join(ids), (x, y), textcoords="offset points", xytext=(6, 5), fontsize=8, color=color)


def draw_sweep(rows: list[TrialRow], *, front: set[str], chosen: str | None, interp: Objective, path: Path) -> Path:
    """Write the sweep's plot to `path` (PNG) and return it.

    Left: completed trials at (interpretability, validation accuracy); the front as a step line, the chosen trial as
    a star. Right: stopped trials at the validation accuracy of their last fine-tune epoch, failed trials on the
    panel's floor (they have no accuracy). Points are labelled with the trial's index (the id's suffix).
    """
    fig = Figure(figsize=(9.5, 5.2), dpi=110, layout="constrained")
    ax, side = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [5, 1.3]})
    ok = [r for r in rows if r.status == "ok" and r.get(ACCURACY.key) is not None and r.get(interp.key) is not None]
    groups: dict[str, dict[tuple[float, float], list[str]]] = {"front": defaultdict(list), "other": defaultdict(list)}
    for r in ok:
        groups["front" if r.trial_id in front else "other"][(r.get(interp.key), r.get(ACCURACY.key))].append(
            _short(r.trial_id))
    for name, color, label in (("other", _OTHER, "completed, dominated"), ("front", _FRONT, "Pareto front")):
        pts = groups[name]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=46, color=color, label=label, zorder=3)
            _label(ax, pts, color)
    line = sorted(groups["front"], key=lambda p: p[0], reverse=not interp.maximize)
    if len(line) > 1:  # staircase: what the front guarantees between its trials
        ax.step([p[0] for p in line], [p[1] for p in line], where="post" if interp.maximize else "pre",
                color=_FRONT, alpha=0.5, zorder=2)
    best = next((r for r in ok if r.trial_id == chosen), None)
    if best is not None:
        ax.scatter([best.get(interp.key)], [best.get(ACCURACY.key)], marker="*", s=360, color=_CHOSEN,
                   edgecolor="white", linewidth=0.8, label=f"chosen (trial {_short(best.trial_id)}, best.yaml)",
                   zorder=4)
    if not interp.maximize:  # fewer features per class is better: better is to the right on both axes
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        xs = [p[0] for g in groups.values() for p in g]
        if xs:
            ax.set_xlim(max(xs) + 0.5, min(xs) - 0.5)  # reversed, with room for the labels

    ax.set_xlabel(f"{interp.label} ({'higher' if interp.maximize else 'lower'} is better)")
    ax.set_ylabel("validation accuracy (higher is better)")
    ax.set_title(f"{len(ok)} completed of {len(rows)} trials; better is up and right", fontsize=10)
    ax.grid(alpha=0.3)

    stopped = [r for r in rows if r.status == "stopped"]
    failed = [r for r in rows if r.status == "failed"]
    ys = [r.get(ACCURACY.key) for r in ok] + [r.get(SCHEDULER_METRIC) for r in stopped
                                              if r.get(SCHEDULER_METRIC) is not None]
    if ys:  # shared by both panels: every point with an accuracy inside, with room for the labels above them
        ax.set_ylim(min(ys) - 0.05, max(ys) + 0.06)
    # Trials without an accuracy (failed ones; stopped before their first report) sit on the panel's floor, drawn
    # in axes coordinates so that they cannot be read as an accuracy.
    floor = blended_transform_factory(side.transData, side.transAxes)
    s_pts: dict[tuple[float, float], list[str]] = defaultdict(list)
    s_none: list[str] = []
    for r in stopped:
        y = r.get(SCHEDULER_METRIC)
        (s_pts[(0.0, y)] if y is not None else s_none).append(_short(r.trial_id))
    if s_pts:
        side.scatter([0.0] * len(s_pts), [p[1] for p in s_pts], marker="v", s=60, color=_STOPPED,
                     label="stopped by ASHA (at its last epoch's validation accuracy)", zorder=3)
        _label(side, s_pts, _STOPPED)
    for x, ids, color, marker in ((0.0, s_none, _STOPPED, "v"), (1.0, [_short(r.trial_id) for r in failed],
                                                                _FAILED, "X")):
        if ids:
            side.scatter([x], [0.04], marker=marker, s=70, color=color, transform=floor, zorder=3, clip_on=False,
                         label="failed (no accuracy; reason in trials.csv)" if color == _FAILED else None)
            side.annotate(",".join(ids), (x, 0.04), xycoords=floor, textcoords="offset points", xytext=(6, 5),
                          fontsize=8, color=color)
    side.set_xlim(-0.6, 1.9)
    side.set_xticks([0, 1], [f"stopped\n({len(stopped)})", f"failed\n({len(failed)})"])
    side.set_title("did not finish", fontsize=10)
    side.grid(alpha=0.3, axis="y")
    handles = [h for a in (ax, side) for h in a.get_legend_handles_labels()[0]]
    labels = [lab for a in (ax, side) for lab in a.get_legend_handles_labels()[1]]
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(handles), 2), fontsize=8,
                   frameon=False)
    fig.suptitle("sweep: chosen on validation (test metrics are in trials.csv, for reading only)", fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
