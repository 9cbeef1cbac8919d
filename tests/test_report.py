"""`mmfw report RUN_DIR`: one self-contained HTML page, checked as text and in a real browser."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
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


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in
            re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


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


def test_report_of_an_unfinished_run(collapsed: Path, tmp_path: Path) -> None:
    """No metrics.json and no plots yet (a run still training): the page says so and draws
    what metrics.jsonl allows."""
    run = tmp_path / "unfinished"
    shutil.copytree(collapsed, run)
    (run / "metrics.json").unlink()
    shutil.rmtree(run / "plots")
    out = tmp_path / "elsewhere" / "page.html"
    result = cli("report", run, "--out", out)
    assert result.exit_code == 0, result.output
    page = out.read_text(encoding="utf-8")
    assert "No metrics.json yet" in page
    assert len(_images(page)) == 2  # training and diagnostics, from metrics.jsonl
    assert not (run / "plots").exists()  # the report does not write into the run


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
    assert dom.stdout.count("<img") == 5
    shot = tmp_path / "shot.png"
    proc = subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1100,1600", url],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    img = Image.open(shot).convert("L")
    assert img.size == (1100, 1600)
    dark = float((np.asarray(img) < 128).mean())
    assert dark > 0.01  # text, tables and figures were drawn, not a blank page
