"""`report.html`: a self-contained page per run that a person can browse (no server, no network, no script).

It is written from what the run directory already holds (metrics.json, config.yaml and explanations/: index.json,
atlas.json, the PNGs, added.json), so `write_html(run_dir)` is cheap and can be rerun, e.g. after
`python -m toolkit.explain --run RUN --images ...` adds local views. Images are files beside the page (relative
links into explanations/); charts are inline SVG. Sections and anchors:

    #metrics        the three models' metrics, each with its direction and a one-line definition; per-class accuracy
    #curves         loss and train accuracy per epoch, every training stage
    #qp             the QP certificate
    #global         the class x feature matrix; every feature links to #f<j>, every class to #class-<c>
    #features       one card per feature (#f<j>): the atlas
    #classes        one card per class (#class-<c>): its features, test images, most confused class with a contrast
    #local          local explanations of correct and wrong test images (#local-correct, #local-wrong) and of
                    images added by the explain CLI (#local-added)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from toolkit.explain.report import (
    METRIC_INFO,
    format_metric,
    metric_label,
    metric_rows,
    undefined_notes,
    validation_note,
)
from toolkit.files import atomic_write_text
from toolkit.metrics import MODELS, REPORTED

REPORT_HTML = "report.html"
ADDED = "added.json"  # in explanations/: local views added by the explain CLI
MAX_BOX_CLASSES = 24  # a feature card's distribution shows at most this many classes (its users first)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:0 16px
 24px;color:#222;line-height:1.4}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-top:12px}h3{margin:4px 0}
table{border-collapse:collapse}td,th{padding:2px 6px;border:1px solid #ddd;font-size:13px}
th{background:#f4f4f4}.num{text-align:right;font-variant-numeric:tabular-nums}
nav a{margin-right:12px}.muted{color:#666;font-size:13px}
.card{border:1px solid #ccc;border-radius:6px;padding:8px 12px;margin:10px 0;background:#fcfcfc}
.card:target{outline:3px solid #e67e22}
.tiles{display:flex;gap:4px;flex-wrap:wrap;font-size:11px;color:#444}
.tiles figure{margin:0;width:128px}.tiles figcaption{overflow:hidden;white-space:nowrap;text-overflow:ellipsis}
table.matrix td,table.matrix th{padding:0;border:1px solid #e4e4e4;width:15px;height:15px;font-size:10px}
table.matrix th.cls{text-align:right;padding-right:4px;width:auto;white-space:nowrap}
table.matrix th.feat{writing-mode:vertical-rl;transform:rotate(180deg);height:auto;padding:2px 0}
table.matrix td.on{background:#333}table.matrix td.shared{background:#c0392b}
table.matrix a{color:inherit;text-decoration:none}
img.view{max-width:100%;border:1px solid #eee}
.wrong{color:#c0392b}.right{color:#1e8449}
"""


def _a(href: str, text: str) -> str:
    return f'<a href="{escape(href, quote=True)}">{escape(text)}</a>'


def _img(src: str, alt: str, cls: str = "view") -> str:
    return f'<img class="{cls}" src="{escape(src, quote=True)}" alt="{escape(alt, quote=True)}">'


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.{digits}f}"
    return escape(str(v))


# ------------------------------------------------------------------------------------------------------ SVG charts


def _tick(v: float) -> str:
    """An axis label: 3 significant digits, float noise around 0 shown as 0."""
    return "0" if abs(v) < 1e-6 else f"{v:.3g}"


def line_chart(series: dict[str, Sequence[float]], *, title: str, width: int = 360, height: int = 170) -> str:
    """An inline SVG line chart of one or more series over epochs 1..n (same x for all), with min/max y labels."""
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    values = [v for s in series.values() for v in s if v is not None]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    n = max(len(s) for s in series.values())
    legend_rows = (len(series) + 3) // 4
    height += 11 * (legend_rows - 1)
    left, right, top, bottom = 44, 8, 20, 34 + 11 * (legend_rows - 1)

    def xy(i: int, v: float) -> str:
        x = left + (width - left - right) * (i / max(1, n - 1))
        y = top + (height - top - bottom) * (1 - (v - lo) / (hi - lo))
        return f"{x:.1f},{y:.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{escape(title, quote=True)}">',
             f'<text x="{left}" y="13" font-size="12" font-weight="bold">{escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
             'fill="none" stroke="#bbb"/>',
             f'<text x="{left - 4}" y="{top + 9}" font-size="10" text-anchor="end">{hi:.3g}</text>',
             f'<text x="{left - 4}" y="{height - bottom}" font-size="10" text-anchor="end">{lo:.3g}</text>',
             f'<text x="{left}" y="{height - bottom + 12}" font-size="10">1</text>',
             f'<text x="{width - right}" y="{height - bottom + 12}" font-size="10" text-anchor="end">{n}</text>',
             f'<text x="{(left + width) / 2:.0f}" y="{height - bottom + 12}" font-size="10" '
             'text-anchor="middle">epoch</text>']
    for ci, (name, s) in enumerate(series.items()):
        colour = colours[ci % len(colours)]
        pts = " ".join(xy(i, v) for i, v in enumerate(s) if v is not None)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{pts}"/>')
        if len(s) == 1:
            parts.append(f'<circle cx="{xy(0, s[0]).split(",")[0]}" cy="{xy(0, s[0]).split(",")[1]}" r="3" '
                         f'fill="{colour}"/>')
        parts.append(f'<text x="{left + 4 + 80 * (ci % 4)}" y="{height - bottom + 26 + 11 * (ci // 4)}" font-size="10" '
                     f'fill="{colour}">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def box_chart(per_class: Sequence[dict[str, float]], classes: Sequence[str], highlight: Sequence[int], *,
              width: int = 420) -> str:
    """Inline SVG: one horizontal box per class (q25..q75, whiskers q5..q95, median tick) of a feature's pooled
    activation on the train split; the classes in `highlight` (the users) in red, listed first."""
    rows = [c for c in highlight if per_class[c]]
    rest = sorted((c for c in range(len(classes)) if c not in highlight and per_class[c]),
                  key=lambda c: -per_class[c]["q50"])
    rows += rest[:max(0, MAX_BOX_CLASSES - len(rows))]
    if not rows:
        return ""
    lo = min(per_class[c]["q5"] for c in rows)
    hi = max(per_class[c]["q95"] for c in rows)
    hi = hi if hi > lo else lo + 1.0
    label_w, row_h, top = 120, 13, 6
    height = top + row_h * len(rows) + 18

    def x(v: float) -> float:
        return label_w + (width - label_w - 8) * (v - lo) / (hi - lo)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             'aria-label="activation per class">']
    for r, c in enumerate(rows):
        q = per_class[c]
        y = top + r * row_h
        colour = "#c0392b" if c in highlight else "#7f8c8d"
        parts += [f'<text x="{label_w - 4}" y="{y + 9}" font-size="10" text-anchor="end" fill="{colour}">'
                  f'{escape(classes[c][:20])}</text>',
                  f'<line x1="{x(q["q5"]):.1f}" x2="{x(q["q95"]):.1f}" y1="{y + 5}" y2="{y + 5}" stroke="{colour}"/>',
                  f'<rect x="{x(q["q25"]):.1f}" y="{y + 1}" width="{max(1.0, x(q["q75"]) - x(q["q25"])):.1f}" '
                  f'height="9" fill="{colour}" fill-opacity="0.35" stroke="{colour}"/>',
                  f'<line x1="{x(q["q50"]):.1f}" x2="{x(q["q50"]):.1f}" y1="{y}" y2="{y + 11}" stroke="{colour}" '
                  'stroke-width="2"/>']
    base = top + row_h * len(rows) + 12
    parts += [f'<text x="{label_w}" y="{base}" font-size="10">{_tick(lo)}</text>',
              f'<text x="{width - 8}" y="{base}" font-size="10" text-anchor="end">{_tick(hi)}</text>',
              f'<text x="{(label_w + width) / 2:.0f}" y="{base}" font-size="10" text-anchor="middle">pooled '
              'activation f (5/25/50/75/95 %)</text></svg>']
    return "".join(parts)


# --------------------------------------------------------------------------------------------------------- sections


def _metrics_section(metrics: dict[str, Any], classes: Sequence[str]) -> list[str]:
    ev = metrics.get("evaluation", {})
    out = ['<section id="metrics"><h2>Metrics</h2>',
           f"<p>{escape(validation_note(metrics))}</p>",
           '<table><tr><th>model</th><th>split</th>'
           + "".join(f"<th>{escape(metric_label(k, label))}</th>" for k, label in REPORTED) + "</tr>"]
    for model, split, sec in metric_rows(metrics):
        out.append(f"<tr><td>{escape(model)}</td><td>{escape(split)}</td>"
                   + "".join(f'<td class="num">{format_metric((sec or {}).get(k), pct=True)}</td>'
                             for k, _ in REPORTED) + "</tr>")
    p2 = metrics.get("linear_probe_dinov2")
    notes = undefined_notes(metrics)
    out.append("</table>" + ("<p>Not computable on this data (n/a above):</p><ul>"
                             + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>" if notes else "")
               + "<p class=\"muted\">Values in %.")
    if p2:
        out.append(f" DINOv2-protocol probe: CLS of the last {escape(str(p2.get('n_blocks')))} block(s)"
                   + (" + average patch token" if p2.get("avgpool") else "")
                   + f", lr {escape(str(p2.get('lr')))}, chosen on "
                   + escape(str(p2.get("chosen_on", "the validation split")))
                   + "; its validation accuracy is the best of the heads it chose among, so it reads high.")
    if ev:
        out.append(f" Accuracy on all {ev.get('test_images')} test images"
                   + (f" and {ev.get('val_images')} validation images" if ev.get("val_images") else "")
                   + f"; SID@{ev.get('sid_k')} and plausibility on {ev.get('map_images')} test images"
                   + (f" and {ev.get('val_map_images')} validation images" if ev.get("val_images") else "")
                   + "; class independence, contrastiveness and correlation on the "
                   f"{ev.get('train_images')} train images trained on.")
    out.append("</p><ul>")
    for key, label in REPORTED:
        if key in METRIC_INFO:
            better, what = METRIC_INFO[key]
            out.append(f"<li><b>{escape(label.split(' (')[0])}</b> ({better} is better): {escape(what)}</li>")
    out.append("</ul>")
    per = {m: (metrics.get(m, {}).get("test") or {}).get("per_class_accuracy") for m in MODELS}
    if any(isinstance(v, dict) for v in per.values()):
        out.append('<h3>Per-class test accuracy (%)</h3><table><tr><th>class</th>'
                   + "".join(f"<th>{escape(m.replace('_', ' '))}</th>" for m in MODELS) + "</tr>")
        for c, name in enumerate(classes):
            cells = "".join(f'<td class="num">{format_metric((per[m] or {}).get(name), pct=True)}</td>'
                            if isinstance(per[m], dict) else "<td>n/a</td>" for m in MODELS)
            out.append(f"<tr><td>{_a(f'#class-{c}', name)}</td>{cells}</tr>")
        out.append("</table>")
    return out


def _curves_section(histories: dict[str, list[dict[str, float]]]) -> list[str]:
    out = ['<section id="curves"><h2>Training curves</h2>']
    if not histories:
        return out + ["<p>No training history recorded (the stage directories are gone).</p>"]
    out.append('<p class="muted">Per epoch, as the trainer logged them (also in TensorBoard: <code>tensorboard '
               "--logdir</code> on the run directory). Loss terms on the left, train (and validation) accuracy on the "
               "right.</p>")
    for stage, hist in histories.items():
        keys = [k for k in hist[0] if k not in ("epoch", "seconds", "train_accuracy", "val_accuracy")] if hist else []
        losses = {k: [h.get(k) for h in hist] for k in keys}
        acc = {"train accuracy": [h.get("train_accuracy") for h in hist]}
        if hist and "val_accuracy" in hist[0]:
            acc["validation accuracy"] = [h.get("val_accuracy") for h in hist]
        out.append(f"<h3>{escape(stage)} ({len(hist)} epochs)</h3><div>"
                   + line_chart(losses, title=f"{stage}: loss") + " "
                   + line_chart(acc, title=f"{stage}: accuracy") + "</div>")
    return out


def _qp_section(qp: dict[str, Any]) -> list[str]:
    out = ['<section id="qp"><h2>QP certificate</h2>']
    if not qp:
        return out + ["<p>Not recorded.</p>"]
    rows = [("status", "solver's verdict (optimal = the bound closes the gap)"), ("objective", "value of the "
            "selection found (higher is better)"), ("bound", "proven upper bound on any selection's objective"),
            ("gap", "relative distance between objective and bound (0 = proven optimal)"),
            ("solver", ""), ("solver_version", ""), ("seconds", "solve time"), ("n_features", "features selected"),
            ("n_per_class", "features per class")]
    out.append("<table>")
    for k, what in rows:
        if k in qp:
            v = qp[k]
            shown = f"{100 * v:.3f} %" if k == "gap" and isinstance(v, (int, float)) else _fmt(v, 6)
            out.append(f"<tr><th>{escape(k)}</th><td>{shown}</td><td class=\"muted\">{escape(what)}</td></tr>")
    return out + ["</table>"]


def _global_section(glob: dict[str, Any]) -> list[str]:
    classes, weight = glob["classes"], glob["weight"]
    k = len(glob["selection"])
    deg = glob["degree"]
    used = sum(d > 0 for d in deg)
    cols = [j for j in glob["feature_order"] if deg[j] > 0]
    out = ['<section id="global"><h2>Global view: which class uses which feature</h2>',
           f"<p>{len(classes)} classes x {used} features used" + (f" (of {k} columns)" if used != k else "")
           + f", {glob['n_per_class']} per class. Dark: the class uses the feature; red: a feature shared by several "
           "classes. Click a feature or a class for its card. Rows and columns are seriated so classes that share "
           "features sit together.</p>",
           '<div style="overflow-x:auto"><table class="matrix"><tr><th></th>'
           + "".join(f'<th class="feat">{_a(f"#f{j}", f"f{j}")}</th>' for j in cols) + "</tr>"]
    for c in glob["class_order"]:
        cells = []
        for j in cols:
            if weight[c][j]:
                cls = "shared" if deg[j] > 1 else "on"
                cells.append(f'<td class="{cls}" title="{escape(classes[c], quote=True)} uses f{j}">'
                             f'<a href="#f{j}">&nbsp;</a></td>')
            else:
                cells.append("<td></td>")
        out.append(f'<tr><th class="cls">{_a(f"#class-{c}", classes[c])}</th>{"".join(cells)}</tr>')
    out.append('<tr><th class="cls muted">classes using it</th>'
               + "".join(f'<td class="num">{deg[j]}</td>' for j in cols) + "</tr></table></div>")
    return out


def _feature_cards(atlas: dict[str, Any]) -> list[str]:
    classes = atlas["classes"]
    out = ['<section id="features"><h2>Features</h2>',
           f"<p>Each feature through the {atlas['top_n']} of the {atlas['n_images']} {escape(atlas['split'])} images "
           "where its pooled activation f is highest (strongest first), with its map over them (jet colours; one "
           "colour range per feature). The box plot is f per class: a feature a class relies on should be high for "
           "that class (red) and low elsewhere.</p>"]
    for card in atlas["features"]:
        j = card["feature"]
        users = ", ".join(_a(f"#class-{c}", n) + (f" (W = {w:g})" if w != 1 else "")
                          for c, n, w in zip(card["used_by"], card["used_by_names"], card["weights"])) or "no class"
        tiles = "".join(f"<figure><figcaption>{escape(e['label_name'])}</figcaption><figcaption>f = "
                        f"{e['activation']:.3f}</figcaption></figure>" for e in card["examples"])
        out.append(f'<div class="card" id="f{j}"><h3>f{j} <span class="muted">(adapter channel {card["channel"]}; '
                   f'μ = {card["mean"]:.3f}, σ = {card["std"]:.3f})</span></h3>'
                   f"<p>Used by: {users}.</p>{_img('explanations/' + card['png'], f'f{j}: strongest training images')}"
                   f'<div class="tiles">{tiles}</div>'
                   + box_chart(card["per_class"], classes, card["used_by"]) + "</div>")
    return out


def _class_cards(index: dict[str, Any]) -> list[str]:
    out = ['<section id="classes"><h2>Classes</h2>']
    for card in index["class_cards"]:
        c = card["class"]
        feats = ", ".join(_a(f"#f{j}", f"f{j}") for j in card["features"]) or "none"
        acc = card["correct"] / card["test_images"] if card["test_images"] else None
        parts = [f'<div class="card" id="class-{c}"><h3>{escape(card["name"])}</h3>',
                 f"<p>Features ({len(card['features'])}): {feats}. Test accuracy {format_metric(acc, pct=True)} % "
                 f"({card['correct']} of {card['test_images']}).</p>"]
        if card["examples_png"]:
            parts.append("<p class=\"muted\">Its most confidently recognised test images:</p>"
                         + _img(f"explanations/{card['examples_png']}", f"{card['name']}: test images"))
        other = card["confused_with"]
        if other:
            link = _a(f"#class-{other['class']}", other["name"])
            parts.append(f"<p>Most confused with {link}: {other['test_images']} "
                         f"test images ({other['as_other']} {escape(card['name'])} predicted as "
                         f"{escape(other['name'])}, {other['as_this']} the other way); {other['shared']} shared "
                         "feature(s). "
                         + ("Contrast (each cell: the test image of its row's class where the feature is strongest):"
                            "</p>" + _img(f"explanations/{other['contrast_png']}", f"{card['name']} vs {other['name']}")
                            if other.get("contrast_png") else "No contrast figure: only the most confused class "
                            "pairs get one.</p>"))
        out.append("".join(parts) + "</div>")
    return out


def _local_card(entry: dict[str, Any], prefix: str) -> str:
    truth = entry.get("label_name")
    verdict = ""
    if truth is not None:
        ok = truth == entry["predicted_name"]
        word = "right" if ok else "wrong"
        verdict = f' <span class="{word}">({word}: true {escape(truth)})</span>'
    feats = " + ".join(f"{f['contribution']:+.2f} ({_a('#f' + str(f['feature']), 'f' + str(f['feature']))})"
                       for f in entry["features"])
    link = _a(f"#class-{entry['predicted']}", entry["predicted_name"])
    return (f'<div class="card"><h3>{escape(Path(entry["image"]).name)}: predicted {link}{verdict}</h3>'
            f"<p>p = {entry['probability']:.3f}; logit {entry['logit']:+.3f} = {feats}.</p>"
            + _img(f"{prefix}{entry['png']}", f"local explanation of {entry['image']}") + "</div>")


def _local_section(index: dict[str, Any], added: list[dict[str, Any]]) -> list[str]:
    right = [e for e in index["locals"] if e["correct"]]
    wrong = [e for e in index["locals"] if not e["correct"]]
    out = ['<section id="local"><h2>Local explanations</h2>',
           "<p>Why one image gets its class: the m features of the predicted class, each map over the image, and "
           "their contributions W·(f − μ)/σ, which add up to the logit exactly.</p>",
           '<div id="local-correct"><h3>Correctly classified test images</h3>',
           *([_local_card(e, "explanations/") for e in right] or ["<p>None.</p>"]), "</div>",
           '<div id="local-wrong"><h3>Misclassified test images</h3>',
           *([_local_card(e, "explanations/") for e in wrong] or ["<p>No test image is misclassified.</p>"]), "</div>"]
    if added:
        out += ['<div id="local-added"><h3>Added images</h3><p class="muted">Explained live by <code>python -m '
                "toolkit.explain --run RUN --images ...</code>.</p>",
                *[_local_card(e, "explanations/added/") for e in added], "</div>"]
    return out


def write_html(run_dir: Path) -> Path:
    """Writes run_dir/report.html from the run's metrics.json and explanations/ (see the module docstring).

    Raises:
        FileNotFoundError: the run has no explanations yet (evaluate it first).
    """
    run_dir = Path(run_dir)
    ex = run_dir / "explanations"
    if not (ex / "index.json").is_file():
        raise FileNotFoundError(f"{ex / 'index.json'} is missing: evaluate the run first (python -m "
                                f"toolkit.stages.evaluate --run {run_dir})")
    index = json.loads((ex / "index.json").read_text())
    atlas = json.loads((ex / index["atlas"]).read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    added = json.loads((ex / ADDED).read_text())["predictions"] if (ex / ADDED).is_file() else []
    classes = index["classes"]
    nav = " ".join(_a(f"#{a}", t) for a, t in (("metrics", "metrics"), ("curves", "training curves"),
                                                 ("qp", "QP certificate"), ("global", "global view"),
                                                 ("features", "features"), ("classes", "classes"),
                                                 ("local", "local explanations")))
    body = [f"<h1>DINO-QPM run report: {escape(run_dir.name)}</h1>",
            f"<p class=\"muted\">{len(classes)} classes, {len(atlas['features'])} selected features, "
            f"{index['global']['n_per_class']} per class. Companion files: "
            f"{_a('metrics.json', 'metrics.json')}, {_a('report.md', 'report.md')}, "
            f"{_a('config.yaml', 'config.yaml')}.</p><nav>{nav}</nav>",
            *_metrics_section(metrics, classes), "</section>", *_curves_section(index.get("histories", {})),
            "</section>", *_qp_section(metrics.get("qp_certificate", {})), "</section>",
            *_global_section(index["global"]),
            "</section>", *_feature_cards(atlas), "</section>", *_class_cards(index), "</section>",
            *_local_section(index, added), "</section>"]
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>DINO-QPM report {escape(run_dir.name)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    path = run_dir / REPORT_HTML
    atomic_write_text(path, page)
    return path
