"""`mmfw report RUN_DIR`: one self-contained HTML page, checked as text and in a real browser."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import tomllib
from PIL import Image

import mmfw
from helpers import assert_user_error, cli
from test_diagnostics import SEED_COLLAPSE, SMALL

pytestmark = pytest.mark.slow

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(scope="module")
def collapsed(tmp_path_factory) -> Path:
    """A tiny run of the seed_collapse recipe: warnings, diagnostics and every plot."""
    root = tmp_path_factory.mktemp("report")
    recipe = mmfw.load_recipe(SEED_COLLAPSE, [*SMALL, f"run.output_dir={root}",
                                              "diagnostics.map_points=32",
                                              "diagnostics.map_method=pca"])
    return mmfw.train(recipe, console=lambda _: None).run_dir


def _images(page: str, kind: str = "png") -> list[bytes]:
    return [base64.b64decode(m) for m in
            re.findall(rf'src="data:image/{kind};base64,([A-Za-z0-9+/=]+)"', page)]


def _failures(page: str) -> str:
    """The failure browser's section of a page."""
    start = page.index('<h2 id="failures">')
    return page[start:page.index("<h2>", start + 1)]


def test_report_content(collapsed: Path) -> None:
    result = cli("report", collapsed)
    assert result.exit_code == 0, result.output
    path = collapsed / "report.html"
    assert result.output.strip() == str(path)
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # final metrics, as metrics.json has them
    metrics = json.loads((collapsed / "metrics.json").read_text())
    for key, value in metrics.items():
        assert f"<th>{key}</th>" in page
        assert f"<td>{value:.1f}</td>" in page
    # the warnings, with the recipe keys that cure them
    warnings = [json.loads(ln) for ln in (collapsed / "warnings.jsonl").read_text().splitlines()]
    assert "COLLAPSE WARNING" in page and "no-gap" in page
    assert f"at step {warnings[0]['step']}" in page
    assert "<code>optim.lr</code>" in page and "<code>loss.temperature</code>" in page
    # the latest diagnostics and their trend
    diag = [json.loads(ln) for ln in (collapsed / "metrics.jsonl").read_text().splitlines()
            if '"diagnostics"' in ln]
    assert f"probe @ {diag[-1]['step']}" in page
    assert "similarity gap (positive - negative)" in page and "effective rank, image" in page
    assert "Gradient norm by part" in page and "adapters" in page
    # the recipe, escaped
    assert 'name = &quot;bn-projection&quot;' in page
    # every plot embedded, nothing fetched from elsewhere
    images = _images(page)
    assert len(images) == 5
    assert all(img[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    for name in ("training.png", "diagnostics.png", "similarity.png", "spectrum.png",
                 "embedding_map.png"):
        assert f'alt="{name}"' in page
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert "<script" not in page and "<link" not in page
    # the failure browser: the 10 worst queries each way of the test split, thumbnails inline
    section = _failures(page)
    n = int(re.search(r"\((\d+) images, (\d+) captions\)", section).group(1))
    for way, total in (("i2t", n), ("t2i", n * 5)):  # 5 captions per synthetic image
        # how many queries miss their top 10 is what Recall@10 in metrics.json says
        outside = round(total * (1 - metrics[f"{way}_R@10"] / 100))
        assert f"{outside} of {total} queries have no correct answer in their top 10" in section
    i2t, t2i = section.split("<h3>Text → image</h3>")
    ranks = [int(r) for r in re.findall(r"<td><b>(\d+)</b>", i2t)]
    assert len(ranks) == 10 and ranks == sorted(ranks, reverse=True)
    assert len(re.findall(r"<td><b>(\d+)</b>", t2i)) == 10
    assert i2t.count('<img class="thumb') == 10  # the query images
    assert t2i.count('<img class="thumb truth"') == 10
    assert t2i.count('<img class="thumb') == 10 * 6  # its image and the top 5
    thumbs = _images(section, "jpeg")
    assert len(thumbs) == 70 and not _images(section)
    for data in thumbs:
        with Image.open(io.BytesIO(data)) as thumb:
            assert thumb.format == "JPEG" and max(thumb.size) <= 64


def test_report_of_an_unfinished_run(collapsed: Path, tmp_path: Path) -> None:
    """No metrics.json and no plots yet (a run still training): the page says so and draws
    what metrics.jsonl allows."""
    run = tmp_path / "unfinished"
    shutil.copytree(collapsed, run)
    (run / "metrics.json").unlink()
    shutil.rmtree(run / "plots")
    out = tmp_path / "elsewhere" / "page.html"
    result = cli("report", run, "--out", out, "--failures", "0")
    assert result.exit_code == 0, result.output
    page = out.read_text(encoding="utf-8")
    assert "No metrics.json yet" in page
    assert len(_images(page)) == 2  # training and diagnostics, from metrics.jsonl
    assert not (run / "plots").exists()  # the report does not write into the run


def _with_data(run: Path, data: dict) -> None:
    """The run's recipe with another [data] section (the model and checkpoint unchanged)."""
    path = run / "recipe.toml"
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    raw["data"] = data
    path.write_text(tomli_w.dumps(raw), encoding="utf-8")


def test_failure_browser_without_model_or_data(collapsed: Path, tmp_path: Path) -> None:
    """No checkpoint, or data this machine cannot read: the page renders and says why."""
    run = tmp_path / "run"
    shutil.copytree(collapsed, run, ignore=shutil.ignore_patterns("report.html"))
    missing = tmp_path / "nowhere" / "test.jsonl"
    _with_data(run, {"dataset": "jsonl", "annotations": str(missing)})
    assert cli("report", run).exit_code == 0
    section = _failures((run / "report.html").read_text(encoding="utf-8"))
    assert "Not shown:" in section and str(missing) in section and "Traceback" not in section
    shutil.rmtree(run / "checkpoints")
    assert cli("report", run).exit_code == 0
    section = _failures((run / "report.html").read_text(encoding="utf-8"))
    assert "Not shown:" in section and "has no checkpoint yet" in section
    assert cli("report", run, "--failures", "0").exit_code == 0
    assert 'id="failures"' not in (run / "report.html").read_text(encoding="utf-8")
    bad = cli("report", run, "--failures", "-1")  # click's own usage error
    assert bad.exit_code == 2 and "--failures" in bad.output and "Traceback" not in bad.output


def test_failure_browser_escapes_captions_and_skips_bad_items(collapsed: Path,
                                                             tmp_path: Path) -> None:
    """Captions are HTML-escaped; a missing image stops the section (data.on_bad =
    "error") or is left out ("skip")."""
    run = tmp_path / "run"
    shutil.copytree(collapsed, run, ignore=shutil.ignore_patterns("report.html"))
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "split": "test",
                     "caption": [f'<b>shape</b> & "{i}"', f"plain caption {i}"]})
    rows.append({"image": "gone.png", "split": "test", "caption": "never seen"})
    table = tmp_path / "pairs.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    _with_data(run, {"dataset": "jsonl", "annotations": str(table)})  # on_bad = "error"
    assert cli("report", run).exit_code == 0
    section = _failures((run / "report.html").read_text(encoding="utf-8"))
    assert "Not shown: bad data in the &#x27;test&#x27; split: 1 problem(s)" in section
    _with_data(run, {"dataset": "jsonl", "annotations": str(table), "on_bad": "skip"})
    result = cli("report", run, "--failures", "2")
    assert result.exit_code == 0, result.output
    section = _failures((run / "report.html").read_text(encoding="utf-8"))
    assert "(4 images, 8 captions)" in section
    assert "1 bad item(s) of the split are left out" in section
    assert "&lt;b&gt;shape&lt;/b&gt; &amp; &quot;" in section and "<b>shape" not in section
    assert len(re.findall(r"<td><b>(\d+)</b>", section)) == 4  # 2 each way
    assert not (run / "skipped.jsonl").exists()  # the report writes nothing into the run


def test_report_errors(tmp_path: Path) -> None:
    assert_user_error(cli("report", tmp_path), "not a run directory")


def _browser() -> str | None:
    return next((b for b in map(shutil.which, BROWSERS) if b), None)


@pytest.mark.skipif(_browser() is None, reason="no headless browser on PATH (looked for "
                    + ", ".join(BROWSERS) + "; Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(collapsed: Path, tmp_path: Path) -> None:
    page = collapsed / "report.html"
    if not page.is_file():
        assert cli("report", collapsed).exit_code == 0
    browser = _browser()
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    url = page.resolve().as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120, check=False)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<h1>mmfw run <code>seed_collapse</code></h1>" in dom.stdout
    assert dom.stdout.count("<img") - dom.stdout.count('class="thumb') == 5  # the plots
    assert 'id="failures"' in dom.stdout and dom.stdout.count('class="thumb') == 70
    shot = tmp_path / "shot.png"
    # tall enough for the whole page down to the failure browser
    proc = subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1100,10000", url],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as picture:
        img = np.asarray(picture.convert("RGB"))
        dark = float((np.asarray(picture.convert("L")) < 128).mean())
    assert img.shape == (10000, 1100, 3)
    assert dark > 0.01  # text, tables and figures were drawn, not a blank page
    # each text -> image failure shows its true image in a #06c frame (2 px around 64 px):
    # find the frames' top-left corners and look inside; a thumbnail that failed to decode
    # would leave the frame white (the synthetic images are dark)
    frame = (img[..., 0] == 0) & (img[..., 1] == 102) & (img[..., 2] == 204)
    corner = (frame[1:-1, 1:-1] & ~frame[:-2, 1:-1] & ~frame[1:-1, :-2] & frame[2:, 1:-1]
              & frame[1:-1, 2:])
    corners = list(zip(*np.nonzero(corner)))
    assert len(corners) == 10
    for y, x in corners:
        inside = img[y + 3:y + 67, x + 3:x + 67]
        assert inside.shape == (64, 64, 3) and inside.mean() < 128
