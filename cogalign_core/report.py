"""Self-contained HTML evaluation report: one page, every plot and image embedded, no URL at all.

The page opens offline from a file (or an e-mail attachment): plots are PNGs drawn with
matplotlib's Agg canvas (no pyplot global state, no fonts or scripts fetched), images are
downscaled JPEG/PNG thumbnails, both inlined as ``data:`` URIs. Output bytes are deterministic for
identical inputs (no timestamps; PNG ``Software`` metadata dropped).
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from cogalign_core import taxonomy
from cogalign_core.io import atomic_write_text

THUMB_SIDE = 160
"""Longest side, in pixels, of gallery thumbnails."""

METRIC_LABELS: dict[str, str] = {
    "format_validity": "Format validity (all prompts)",
    "accuracy_location": "Location accuracy",
    "accuracy_morphology": "Morphology accuracy",
    "accuracy_microvascular": "Microvascular accuracy",
    "accuracy_diagnosis": "Diagnosis accuracy",
    "diagnosis_macro_f1": "Diagnosis macro-F1",
    "lesion_sensitivity": "Lesion sensitivity (real lesions)",
    "real_normal_specificity": "Real-normal specificity",
    "balanced_accuracy": "Balanced accuracy (sensitivity + specificity) / 2",
    "counterfactual_specificity": "Counterfactual specificity",
    "control_consistency": "Control consistency",
    "counterfactual_flip_rate": "Counterfactual flip rate (per pair)",
    "counterfactual_control_gap": "Counterfactual - control flip gap",
    "both_diagnosis_accuracy": "'Both' image diagnosis accuracy",
    "box_iou": "Box IoU (grounded)",
    "probe_agreement_blank": "Blank-image agreement (lower = looks)",
    "probe_agreement_shuffled": "Shuffled-image agreement (lower = looks)",
}


@dataclass
class GalleryItem:
    """One real lesion sample shown with its derived images and every model's answers.

    Attributes:
        title: caption (sample id, dataset).
        images: ``(label, workspace path or None)`` in display order (original, mask, counterfactual,
            control); ``None`` shows "not available".
        answers: ``{model: {condition: short answer text}}``.
    """

    title: str
    images: list[tuple[str, str | None]]
    answers: dict[str, dict[str, str]] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Embedding helpers
# --------------------------------------------------------------------------------------------

def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_data_uri(path: str | os.PathLike[str], max_side: int = THUMB_SIDE) -> str:
    """Downscaled thumbnail of an image file as a ``data:`` URI (JPEG for RGB, PNG for masks)."""
    with Image.open(path) as im:
        im.load()
        # single-channel files are masks: keep them binary-looking (PNG, nearest-neighbour)
        img = im.convert("L") if im.mode in ("1", "L") else im.convert("RGB")
    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS if img.mode == "RGB" else Image.Resampling.NEAREST)
    buf = io.BytesIO()
    if img.mode == "RGB":
        img.save(buf, format="JPEG", quality=80, optimize=True)
        return _data_uri(buf.getvalue(), "image/jpeg")
    img.save(buf, format="PNG", optimize=True)
    return _data_uri(buf.getvalue(), "image/png")


def figure_data_uri(fig: Figure) -> str:
    """Render a matplotlib figure (Agg) to a PNG ``data:`` URI with no timestamp metadata."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    return _data_uri(buf.getvalue(), "image/png")


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------

def _stat(metrics: Mapping[str, Any], model: str, section: str, name: str) -> Mapping[str, Any] | None:
    return metrics.get(model, {}).get(section, {}).get("all", {}).get(name)


def grouped_bar_figure(metrics: Mapping[str, Any], models: Sequence[str], section: str, names: Sequence[str],
                       title: str) -> Figure:
    """Bars of ``names`` per model with 95 % bootstrap whiskers; baselines as black/grey ticks.

    A metric with no value (n = 0) is drawn as an empty slot labelled ``n=0``.
    """
    fig = Figure(figsize=(max(5.0, 1.1 * len(names) + 2), 3.4))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(models))
    x = np.arange(len(names))
    for i, model in enumerate(models):
        for j, name in enumerate(names):
            s = _stat(metrics, model, section, name)
            pos = x[j] - 0.4 + width * (i + 0.5)
            if not s or s["value"] is None:
                ax.text(pos, 0.02, "n=0", rotation=90, ha="center", va="bottom", fontsize=7)
                continue
            err = None
            if s["ci_low"] is not None:
                err = [[s["value"] - s["ci_low"]], [s["ci_high"] - s["value"]]]
            ax.bar(pos, s["value"], width, yerr=err, capsize=2, color=f"C{i}", label=model if j == 0 else None)
    for j, name in enumerate(names):
        s = next((_stat(metrics, m, section, name) for m in models if _stat(metrics, m, section, name)), None)
        if not s:
            continue
        # side by side, so equal baselines do not hide each other
        for key, colour, dx in (("constant_baseline", "k", -0.12), ("majority_baseline", "0.6", 0.12)):
            if s.get(key) is not None:
                ax.plot([x[j] + dx], [s[key]], "_", markersize=14, markeredgewidth=2.5, color=colour)
    ax.set_xticks(x, [METRIC_LABELS.get(n, n).split(" (")[0] for n in names], rotation=25, ha="right", fontsize=8)
    ax.set_ylim(min(0.0, _min_value(metrics, models, section, names)), 1.05)
    ax.set_title(f"{title} ({section}); black tick = constant answer, grey = majority class", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def _min_value(metrics: Mapping[str, Any], models: Sequence[str], section: str, names: Sequence[str]) -> float:
    lows = [s["ci_low"] for m in models for n in names
            if (s := _stat(metrics, m, section, n)) and s.get("ci_low") is not None]
    return min([0.0, *lows]) - 0.05 if lows and min(lows) < 0 else 0.0


def confusion_figure(pairs: Sequence[tuple[str, str]], title: str) -> Figure:
    """Heatmap of ``(actual, predicted)`` counts; rows = actual, columns = predicted."""
    actual = sorted({a for a, _ in pairs})
    predicted = sorted({p for _, p in pairs} | set(actual))
    counts = np.zeros((len(actual), len(predicted)), dtype=int)
    for a, p in pairs:
        counts[actual.index(a), predicted.index(p)] += 1
    fig = Figure(figsize=(1.2 + 0.7 * len(predicted), 1.0 + 0.5 * max(1, len(actual))))
    ax = fig.add_subplot()
    if pairs:
        ax.imshow(counts, cmap="Blues", aspect="auto")
        for (i, j), c in np.ndenumerate(counts):
            ax.text(j, i, str(c), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(predicted)), predicted, rotation=30, ha="right", fontsize=7)
    ax.set_yticks(range(len(actual)), actual, fontsize=7)
    ax.set_xlabel("predicted", fontsize=8)
    ax.set_ylabel("actual", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f2f2f2} td.num{font-variant-numeric:tabular-nums;white-space:nowrap}
.na{color:#999} .note{color:#555;font-size:13px} figure{display:inline-block;margin:4px;text-align:center}
figcaption{font-size:11px} .gal td{font-size:11px} img{image-rendering:auto}
"""


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _cell(s: Mapping[str, Any] | None) -> str:
    if not s or s.get("value") is None:
        n = 0 if not s else s.get("n", 0)
        return f'<td class="num na">n={n}, no value</td>'
    ci = f" [{_fmt(s['ci_low'])}, {_fmt(s['ci_high'])}]" if s.get("ci_low") is not None else ""
    return f'<td class="num">{_fmt(s["value"])}{ci} <span class="na">n={s["n"]}</span></td>'


def metrics_table_html(stats_by_model: Mapping[str, Mapping[str, Any]], caption: str) -> str:
    """HTML table: one row per metric, one column per model (value [95 % CI] n), then both baselines.

    ``stats_by_model`` maps model -> metric name -> stat dict (see :func:`cogalign_core.metrics.summarise`).
    Baselines are taken from the first model that has the metric (every model sees the same prompts).
    """
    models = list(stats_by_model)
    names = list(dict.fromkeys(n for m in models for n in stats_by_model[m]))
    head = "".join(f"<th>{html.escape(m)}<br><small>value [95% CI]</small></th>" for m in models)
    rows = []
    for name in names:
        cells = "".join(_cell(stats_by_model[m].get(name)) for m in models)
        ref = next((stats_by_model[m][name] for m in models if name in stats_by_model[m]), {})
        rows.append(f"<tr><th>{html.escape(METRIC_LABELS.get(name, name))}</th>{cells}"
                    f'<td class="num">{_fmt(ref.get("constant_baseline"))}</td>'
                    f'<td class="num">{_fmt(ref.get("majority_baseline"))}</td></tr>')
    return (f"<table><caption>{html.escape(caption)}</caption><tr><th>metric</th>{head}"
            "<th>constant answer</th><th>majority class</th></tr>" + "".join(rows) + "</table>")


def _gallery_html(items: Sequence[GalleryItem], models: Sequence[str], workspace: Path) -> str:
    out = []
    for item in items:
        figs = []
        for label, rel in item.images:
            path = workspace / rel if rel else None
            if path is not None and path.is_file():
                figs.append(f'<figure><img alt="{html.escape(label)}" src="{image_data_uri(path)}">'
                            f"<figcaption>{html.escape(label)}</figcaption></figure>")
            else:
                figs.append(f'<figure><div class="na" style="width:{THUMB_SIDE}px">not available</div>'
                            f"<figcaption>{html.escape(label)}</figcaption></figure>")
        if not models:  # images only (e.g. counterfactual syntheses)
            out.append(f"<h3>{html.escape(item.title)}</h3>{''.join(figs)}")
            continue
        conditions = list(dict.fromkeys(c for m in models for c in item.answers.get(m, {})))
        head = "".join(f"<th>{html.escape(c)}</th>" for c in conditions)
        body = "".join(
            f"<tr><th>{html.escape(m)}</th>"
            + "".join(f"<td>{html.escape(item.answers.get(m, {}).get(c, '-'))}</td>" for c in conditions)
            + "</tr>" for m in models)
        out.append(f"<h3>{html.escape(item.title)}</h3>{''.join(figs)}"
                   f'<table class="gal"><tr><th>model</th>{head}</tr>{body}</table>')
    return "".join(out)


def _coverage_html(cov: Mapping[str, Any]) -> str:
    """Lesion parents, how many got a usable counterfactual, and why the others did not."""
    rows = [("lesion parents", cov.get("parents")), ("usable (counterfactual and control)", cov.get("usable")),
            ("usable share", cov.get("usable_fraction")),
            ("usable with the fill clipped to the lens image", cov.get("usable_border_clipped"))]
    rows += [(f"excluded: {reason}", n) for reason, n in (cov.get("excluded_by_reason") or {}).items()]
    body = "".join(f'<tr><th>{html.escape(k)}</th><td class="num">{v if isinstance(v, int) else _fmt(v)}</td></tr>'
                   for k, v in rows)
    return f"<table><caption>counterfactual coverage, all splits</caption>{body}</table>"


def render_report(metrics: Mapping[str, Any], confusion: Mapping[str, Sequence[tuple[str, str]]],
                  gallery: Sequence[GalleryItem], workspace: str | os.PathLike[str],
                  notes: Sequence[str] = (), title: str = "CogAlign evaluation",
                  cf_coverage: Mapping[str, Any] | None = None, cf_gallery: Sequence[GalleryItem] = ()) -> str:
    """The whole report page as a string.

    Args:
        metrics: ``{model: {section: {"all": {metric: stat}, "by_source": {dataset: {metric: stat}}}}}``.
        confusion: ``{f"{model}/{section}": [(actual, predicted), ...]}`` diagnosis pairs on real images.
        gallery: lesion samples to show (images are read from ``workspace``).
        notes: plain-text paragraphs (counts, exclusions, what baselines mean).
        cf_coverage: :func:`cogalign_core.cf_coverage.coverage` of the counterfactual table (all splits).
        cf_gallery: counterfactual syntheses to show before/after (no model answers).
    """
    ws = Path(workspace)
    models = list(metrics)
    sections = list(dict.fromkeys(s for m in models for s in metrics[m]))
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    level_names = [f"accuracy_{lv}" for lv in taxonomy.LEVELS] + ["diagnosis_macro_f1"]
    looking = ["lesion_sensitivity", "real_normal_specificity", "balanced_accuracy", "counterfactual_specificity",
               "control_consistency", "counterfactual_flip_rate", "counterfactual_control_gap",
               "probe_agreement_blank", "probe_agreement_shuffled"]
    for section in sections:
        parts.append(f"<h2>Section: {html.escape(section)}</h2>")
        by_model = {m: metrics[m][section]["all"] for m in models if section in metrics[m]}
        parts.append(metrics_table_html(by_model, f"{section}: all sources"))
        for names, label in ((level_names, "Per-level accuracy"), (looking, "Does it look at the lesion?")):
            uri = figure_data_uri(grouped_bar_figure(metrics, models, section, names, label))
            parts.append(f'<figure><img alt="{html.escape(label)}" src="{uri}"></figure>')
        for m in models:
            pairs = confusion.get(f"{m}/{section}", [])
            if pairs:
                uri = figure_data_uri(confusion_figure(pairs, f"{m}: diagnosis ({section})"))
                parts.append(f'<figure><img alt="confusion {html.escape(m)}" src="{uri}"></figure>')
        sources = sorted({d for m in models for d in metrics[m].get(section, {}).get("by_source", {})})
        for ds in sources:
            per = {m: metrics[m][section]["by_source"][ds] for m in models
                   if ds in metrics[m].get(section, {}).get("by_source", {})}
            parts.append(f"<details><summary>Source {html.escape(ds)}</summary>"
                         f"{metrics_table_html(per, f'{section}: {ds}')}</details>")
    if gallery:
        parts.append("<h2>Gallery: original / mask / counterfactual / control</h2>")
        parts.append(_gallery_html(gallery, models, ws))
    if cf_coverage:
        parts.append("<h2>Counterfactual coverage</h2>" + _coverage_html(cf_coverage))
    if cf_gallery:
        parts.append("<h2>Counterfactual synthesis: before / after</h2>")
        parts.append(_gallery_html(cf_gallery, [], ws))
    parts.append("</body></html>\n")
    return "".join(parts)


def write_report(path: str | os.PathLike[str], *args: Any, **kwargs: Any) -> None:
    """:func:`render_report` then an atomic write of the page to ``path``."""
    atomic_write_text(path, render_report(*args, **kwargs))
