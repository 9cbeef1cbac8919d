"""``mmfw report RUN_DIR``: one self-contained HTML page about a run.

Recipe, final metrics, evaluations during training, the latest collapse diagnostics and their
trend, warnings, every plot of the run embedded as a base64 PNG, and a failure browser: the
worst-ranked queries of the test split both ways, with thumbnails (base64 JPEG) of the images
involved. The page has no external assets, so it can be mailed, attached to an issue or opened
offline.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data.augment import as_uint8
from ..data.datasource import BadData, CheckedSource, Prepared
from ..eval.retrieval import METRIC_KEYS, embed_options, embed_split
from ..registry import create
from ..run.loaded import LoadedRun, load_run
from ..run.rundir import METRICS_JSONL, RECIPE_FILE, RunDir
from ..spi.errors import MmfwError
from .failures import Failure, worst_queries
from .plots import diagnostics_plot, training_plot

REPORT_HTML = "report.html"
#: worst-ranked queries shown per direction by default (``mmfw report --failures N``)
FAILURES = 10
#: candidates shown per failed query
FAILURE_TOP_K = 5
#: longest side of a thumbnail, in pixels
THUMB = 64

#: diagnostics shown in the report: (row key without the batch/probe prefix, label, better)
DIAG_KEYS = (
    ("sim/pos_mean", "positive (diagonal) similarity", "up"),
    ("sim/neg_mean", "negative (off-diagonal) similarity", ""),
    ("sim/gap", "similarity gap (positive - negative)", "up"),
    ("sim/std", "similarity std", ""),
    ("image/eff_rank", "effective rank, image", "up"),
    ("text/eff_rank", "effective rank, text", "up"),
    ("image/low_var_dims", "low-variance dimensions, image", "down"),
    ("text/low_var_dims", "low-variance dimensions, text", "down"),
    ("align", "alignment (Wang & Isola)", "down"),
    ("image/uniformity", "uniformity, image", "down"),
    ("text/uniformity", "uniformity, text", "down"),
    ("modality_gap", "modality gap (centroid distance)", ""),
)
PLOT_CAPTIONS = {
    "training.png": "Loss by term, learning rate (and temperature), retrieval over evaluations.",
    "diagnostics.png": "Collapse diagnostics over training; dashed lines mark warnings.",
    "similarity.png": "Test split: cosine similarity of positive pairs vs all other pairs.",
    "spectrum.png": "Test split: covariance eigen-spectrum of the normalised embeddings.",
    "embedding_map.png": "Test split: 2-D map of images and captions, pairs linked.",
}

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1100px;padding:0 1em;color:#222;line-height:1.4}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:right}th{background:#f5f5f5}td:first-child,th:first-child{text-align:left}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em}
.warn pre{white-space:pre-wrap}
.warn{background:#fff3f3;border-left:4px solid #c00;padding:.2em .8em;margin:.6em 0}
.ok{background:#f3fff3;border-left:4px solid #090;padding:.4em .8em}
.muted{color:#777}figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}
.good{color:#070}.bad{color:#b00}
table.fail td,table.fail th{text-align:left;vertical-align:top}
table.fail ol{margin:0;padding-left:1.4em}
img.thumb{width:64px;height:64px;object-fit:contain;image-rendering:pixelated;
border:2px solid #ccc;background:#fff}img.thumb.hit{border-color:#090}
img.thumb.truth{border-color:#06c}.cands{display:flex;gap:.4em}
table.fail td:nth-child(2){white-space:nowrap}
.cands figure{margin:0;text-align:center;font-size:.8em}
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return "–" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return _esc(value)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    th = "".join(f"<th>{_esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    table = f'<table class="{cls}">' if cls else "<table>"
    return f"{table}<thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _trend(first: Any, last: Any, better: str) -> str:
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (first, last)):
        return ""
    if abs(last - first) <= max(1e-4, 0.01 * max(abs(first), abs(last))):
        return "→"
    if not better:
        return "↑" if last > first else "↓"
    up = last > first
    good = up == (better == "up")
    return f'<span class="{"good" if good else "bad"}">{"↑" if up else "↓"}</span>'


def _metrics_section(run_dir: RunDir, rows: list[dict]) -> str:
    out = ["<h2>Final evaluation</h2>"]
    final = [r for r in rows if r.get("type") == "eval" and r.get("final")]
    if run_dir.metrics_file.is_file():
        metrics = run_dir.read_metrics()
        split = final[-1]["split"] if final else "final"
        out.append(f"<p>Split <b>{_esc(split)}</b> (metrics.json).</p>")
        out.append(_table(list(metrics), [[_num(metrics[k], 1) for k in metrics]]))
    else:
        out.append('<p class="muted">No metrics.json yet: the run has not finished its final '
                   "evaluation.</p>")
    evals = [r for r in rows if r.get("type") == "eval" and not r.get("final")]
    if evals:
        out.append("<h3>Evaluations during training</h3>")
        out.append(_table(["split", "epoch", "step", *METRIC_KEYS],
                          [[_esc(r.get("split")), _num(r.get("epoch")), _num(r.get("step")),
                            *[_num(r.get(k), 1) for k in METRIC_KEYS]] for r in evals]))
    return "".join(out)


def _training_section(rows: list[dict]) -> str:
    train = [r for r in rows if r.get("type") == "train"]
    if not train:
        return '<h2>Training</h2><p class="muted">No training rows logged.</p>'
    last = train[-1]
    speeds = [r["samples_per_s"] for r in train if isinstance(r.get("samples_per_s"), float)]
    items = [("steps logged up to", _num(last["step"])), ("epoch", _num(last.get("epoch"))),
             ("first loss", _num(train[0].get("loss"), 4)),
             ("last loss", _num(last.get("loss"), 4)),
             ("last learning rate", _num(last.get("lr"))),
             ("mean samples/s", _num(sum(speeds) / len(speeds), 1) if speeds else "–")]
    if "temperature" in last:
        items.append(("temperature (last)", _num(last["temperature"], 4)))
    return "<h2>Training</h2>" + _table(["", "value"], [[_esc(k), v] for k, v in items])


def _warnings_section(rows: list[dict]) -> str:
    warnings = [r for r in rows if r.get("type") == "warning"]
    out = ["<h2>Warnings</h2>"]
    if not warnings:
        out.append('<p class="ok">No collapse warning was raised.</p>')
    for w in warnings:
        out.append(f'<div class="warn"><p><b>{_esc(w.get("symptom"))}</b> at step '
                   f'{_num(w.get("step"))} ({_esc(w.get("source"))} batch). Recipe keys to '
                   f'look at: {", ".join(f"<code>{_esc(k)}</code>" for k in w.get("keys", []))}'
                   f'</p><pre>{_esc(w.get("message", ""))}</pre></div>')
    return "".join(out)


def _diagnostics_section(rows: list[dict]) -> str:
    diag = [r for r in rows if r.get("type") == "diagnostics"]
    out = ["<h2>Collapse diagnostics</h2>"]
    if not diag:
        out.append('<p class="muted">No diagnostics rows (diagnostics.every = 0, or the run '
                   "was shorter than one diagnostics interval).</p>")
        return "".join(out)
    first, last = diag[0], diag[-1]
    sources = [s for s in ("probe", "batch") if f"{s}/sim/gap" in last]
    probe = (f" The probe batch is {_num(last.get('probe/size'))} pairs of the "
             f"'{_esc(last.get('probe/split'))}' split, embedded in eval mode."
             if "probe" in sources else "")
    out.append(f"<p>{len(diag)} checks, steps {first['step']}–{last['step']}; latest values "
               f"and the trend since the first check (green: the healthy direction).{probe}</p>")
    head = ["statistic"]
    for s in sources:
        head += [f"{s} @ {first['step']}", f"{s} @ {last['step']}", "trend"]
    table = []
    for key, label, better in DIAG_KEYS:
        row = [_esc(label)]
        for s in sources:
            a, b = first.get(f"{s}/{key}"), last.get(f"{s}/{key}")
            row += [_num(a), _num(b), _trend(a, b, better)]
        table.append(row)
    out.append(_table(head, table))
    grads = sorted({k for r in diag for k in r if k.startswith("grad/")})
    if grads:
        out.append("<h3>Gradient norm by part</h3>")
        out.append(_table(["part", f"@ {first['step']}", f"@ {last['step']}", "max"],
                          [[_esc(k[5:]), _num(first.get(k)), _num(last.get(k)),
                            _num(max((r.get(k) or 0.0) for r in diag))] for k in grads]))
    return "".join(out)


def _plots_section(run_dir: RunDir, rows: list[dict]) -> str:
    out = ["<h2>Plots</h2>"]
    plot_dir = run_dir.plots
    found = {p.name: p for p in sorted(plot_dir.glob("*.png"))} if plot_dir.is_dir() else {}
    with tempfile.TemporaryDirectory() as tmp:
        # a run still training has no plots yet: draw the ones metrics.jsonl allows
        for name, draw in (("training.png", training_plot), ("diagnostics.png",
                                                             diagnostics_plot)):
            if name not in found and rows:
                made = draw(run_dir / METRICS_JSONL, Path(tmp) / name)
                if made is not None:
                    found[name] = made
        order = [n for n in PLOT_CAPTIONS if n in found] + sorted(set(found) - set(PLOT_CAPTIONS))
        if not order:
            out.append('<p class="muted">No plots.</p>')
        for name in order:
            caption = PLOT_CAPTIONS.get(name, name)
            out.append(f'<figure><img alt="{_esc(name)}" src="{_png(found[name])}">'
                       f"<figcaption>{_esc(name)}: {_esc(caption)}</figcaption></figure>")
    return "".join(out)


class _Thumbs:
    """Thumbnails of a split's images as ``data:`` URIs, each made once."""

    def __init__(self, split: Prepared) -> None:
        self.split, self.made = split, {}

    def __call__(self, row: int) -> str:
        if row not in self.made:
            from PIL import Image

            pixels = as_uint8(self.split[row].image)
            picture = Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())
            picture.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            # no chroma subsampling: the colours of small images stay where they are
            picture.save(buf, "JPEG", quality=90, subsampling=0)
            self.made[row] = ("data:image/jpeg;base64,"
                              + base64.b64encode(buf.getvalue()).decode("ascii"))
        return self.made[row]

    def img(self, row: int, cls: str = "") -> str:
        classes = f"thumb {cls}" if cls else "thumb"
        return (f'<img class="{classes}" alt="image {row}" title="image {row}" '
                f'src="{self(row)}">')


def _eval_split(loaded: LoadedRun, say: list[str]) -> Prepared:
    """The run's evaluation split as ``mmfw eval`` reads it (``data.on_bad`` honoured; what
    is skipped is said, nothing is written into the run)."""
    recipe = loaded.recipe
    source = create("dataset", recipe.data.dataset.name, options=recipe.data.dataset.options)
    name = recipe.eval.split
    if name not in source.splits:
        raise MmfwError(f"dataset '{recipe.data.dataset.name}' has no split '{name}' "
                        f"(it has {', '.join(source.splits)})")
    policy = BadData(recipe.data.on_bad, None, say.append, evaluating=True)
    return CheckedSource(source, recipe, policy).split(name)


def _candidates(f: Failure, thumbs: _Thumbs) -> str:
    cells = []
    for row, score, hit in zip(f.top, f.scores, f.correct):
        mark = '<span class="good">✓</span>' if hit else ""
        cells.append(f"<figure>{thumbs.img(row, 'hit' if hit else '')}"
                     f"<figcaption>{mark}{score:.3f}</figcaption></figure>")
    return f'<div class="cands">{"".join(cells)}</div>'


def _failures_section(run_dir: RunDir, count: int) -> str:
    head = '<h2 id="failures">Worst-ranked queries</h2>'
    notes: list[str] = []
    try:
        loaded = load_run(run_dir.path)
        split = _eval_split(loaded, notes)
        ev = loaded.recipe.eval
        device, autocast = loaded.placed()  # the precision metrics.json was made in
        images, texts, owner = embed_split(loaded.model, split, batch_size=ev.batch_size,
                                           max_images=ev.max_images, device=device,
                                           autocast=autocast,
                                           **embed_options(loaded.recipe))
    except (MmfwError, OSError) as err:
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f'{head}<p class="muted">Not shown: {_esc(why.rstrip(".:"))}.</p>'
    load_failures = len(notes)
    n, m = images.shape[0], texts.shape[0]
    captions = [c for i in range(n) for c in split.captions(i)]  # embed_split's order
    found = worst_queries(images, texts, owner, count, FAILURE_TOP_K)
    thumbs = _Thumbs(split)
    k = FAILURE_TOP_K
    skipped = len(split.split) - len(split)
    a, b = len(found.i2t), len(found.t2i)
    shown = (f"the {a} worst queries each way" if a == b else
             f"the {a} worst image queries and the {b} worst caption queries")
    out = [head, f"<p>The <b>{_esc(ev.split)}</b> split ({n} images, {m} captions), embedded "
                 f"with the checkpoint of step {loaded.step} and ranked by cosine similarity "
                 f"as in the evaluation. A rank is that of the best correct candidate "
                 f"(rank &le; K is a hit at Recall@K). Worst first: {shown}, each with "
                 f"its top {k}.</p>"]
    if skipped:
        out.append(f'<p class="muted">{skipped} bad item(s) of the split are left out '
                   f'(data.on_bad = "skip").</p>')
    if load_failures:
        out.append(f'<p class="muted">{load_failures} image(s) failed to load while '
                   "embedding; a blank image stands in for each.</p>")
    if ev.rerank_top_k:
        out.append(f'<p class="muted">These are the dual encoder\'s ranks, before the fusion '
                   f"head re-ranks each top {ev.rerank_top_k} (eval.rerank_top_k), so they "
                   "can differ from metrics.json.</p>")
    for name, ranks, total in (("image → text", found.i2t_ranks, m),
                               ("text → image", found.t2i_ranks, n)):
        median = int(ranks.float().median().item()) if ranks.numel() else 0
        outside = int((ranks > 10).sum())
        out.append(f"<p><b>{name}</b>: median rank {median} of {total}; {outside} of "
                   f"{ranks.numel()} queries have no correct answer in their top 10.</p>")
    rows = []
    for f in found.i2t:
        items = "".join(
            f'<li class="{"good" if hit else ""}">{"✓ " if hit else ""}{_esc(captions[j])} '
            f'<span class="muted">{score:.3f}</span></li>'
            for j, score, hit in zip(f.top, f.scores, f.correct))
        truth = (f'{_esc(captions[f.truth])} <span class="muted">{f.truth_score:.3f}</span>'
                 if f.truth >= 0 else '<span class="muted">(the image has no caption)</span>')
        rows.append([thumbs.img(f.query), f'<b>{f.rank}</b> <span class="muted">/ {m}</span>',
                     f"<ol>{items}</ol>", truth])
    if rows:
        out.append("<h3>Image → text</h3>")
        out.append(_table(["query image", "rank", f"top {k} captions (✓ correct, cosine)",
                           "its best-ranked caption"], rows, "fail"))
    rows = []
    for f in found.t2i:
        truth = (f"<figure>{thumbs.img(f.truth, 'truth')}<figcaption>"
                 f"{f.truth_score:.3f}</figcaption></figure>")
        rows.append([_esc(captions[f.query]), f'<b>{f.rank}</b> <span class="muted">/ {n}</span>',
                     f'<div class="cands">{truth}</div>', _candidates(f, thumbs)])
    if rows:
        out.append("<h3>Text → image</h3>")
        out.append(_table(["query caption", "rank", "its image",
                           f"top {k} images (✓ correct, cosine)"], rows, "fail"))
    return "".join(out)


def render_report(run_dir: str | Path, *, failures: int = FAILURES) -> str:
    """The HTML text of a run's report (nothing is written).

    ``failures``: worst-ranked queries shown per direction (0: no failure browser, and the
    model is not loaded).
    """
    d = RunDir.existing(run_dir)
    if not d.recipe_file.is_file():
        raise MmfwError(f"{d} is not a run directory (no {RECIPE_FILE} in it)")
    rows = d.rows(warn=lambda _: None)  # a torn last line (a killed run) is left out
    recipe = d.recipe_file.read_text(encoding="utf-8")
    name = d.name
    when = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>mmfw report: {_esc(name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>mmfw run <code>{_esc(name)}</code></h1>",
        f'<p class="muted">{_esc(d.path.resolve())} · report generated {when}</p>',
        _metrics_section(d, rows),
        _warnings_section(rows),
        _diagnostics_section(rows),
        _training_section(rows),
        _plots_section(d, rows),
        _failures_section(d, failures) if failures > 0 else "",
        f"<h2>Recipe</h2><pre>{_esc(recipe)}</pre>",
        "</body></html>",
    ]
    return "\n".join(parts)


def write_report(run_dir: str | Path, out: str | Path | None = None, *,
                 failures: int = FAILURES) -> Path:
    """Write the report (default ``RUN_DIR/report.html``) and return its path."""
    path = Path(out) if out is not None else Path(run_dir) / REPORT_HTML
    text = render_report(run_dir, failures=failures)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
