"""Third-party plugins in contrib/: installed as a user would, listed with their distribution,
used from a recipe; the DCL loss property-tested like the built-ins; the docs quote real code.

The distributions are pip-installed once per module into a private folder that only the
``python -m mmfw`` subprocesses see (on their PYTHONPATH): the shared environment, and so the
registry of this pytest process, never contains them. In-process tests import the sources by
file for the same reason (a folder on ``sys.path`` holding a ``*.dist-info`` would register
the entry points in every later test).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import mmfw
from helpers import TINY, assert_user_error, cli, load_package, mmfw_cli
from mmfw.errors import DataError, RecipeError
from mmfw.eval.retrieval import METRIC_KEYS
from mmfw.options import build, describe

ROOT = Path(__file__).resolve().parents[1]
CONTRIB = ROOT / "contrib"
LOSS_DIST, ENCODER_DIST = "mmfw-loss-example", "mmfw-encoder-example"
LOSS_PKG = CONTRIB / LOSS_DIST / "src" / "mmfw_dcl"
ENCODER_PKG = CONTRIB / ENCODER_DIST / "src" / "mmfw_cnn_encoders"


dcl_pkg = load_package(LOSS_PKG)
encoders = load_package(ENCODER_PKG)
DCL, DCLOptions = dcl_pkg.DCL, dcl_pkg.DCLOptions

fast = settings(max_examples=25, deadline=None)


# ---- installed like a user would -------------------------------------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """Both distributions, pip-installed (built from copies: the source tree stays clean)."""
    pytest.importorskip("setuptools", reason="building the contrib distributions needs it")
    root = tmp_path_factory.mktemp("contrib")
    sources = []
    for dist in (LOSS_DIST, ENCODER_DIST):
        shutil.copytree(CONTRIB / dist, root / "src" / dist,
                        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        sources.append(str(root / "src" / dist))
    target = root / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--no-build-isolation", "--no-cache-dir", "--target", str(target), *sources],
        capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return target


def contrib_recipe(output_dir: Path) -> dict:
    """TINY with the contrib loss and both contrib encoders."""
    recipe = json.loads(json.dumps(TINY))
    recipe["run"].update(name="contrib", output_dir=str(output_dir))
    recipe["model"]["vision"] = {"name": "cnn-vision", "image_size": 16, "widths": [8, 16],
                                 "blocks": 1}
    recipe["model"]["text"] = {"name": "gru-text", "vocab_size": 200, "embed_dim": 16,
                               "width": 32}
    recipe["loss"] = {"name": "dcl", "weighted": True}
    return recipe


def test_shared_environment_does_not_have_them():
    for dist in (LOSS_DIST, ENCODER_DIST):
        with pytest.raises(importlib.metadata.PackageNotFoundError):
            importlib.metadata.distribution(dist)
    assert "dcl" not in mmfw.available("loss")
    assert "cnn-vision" not in mmfw.available("encoder")


def test_installed_distributions_declare_their_entry_points(site):
    eps = {d.metadata["Name"]: {(e.group, e.name, e.value) for e in d.entry_points}
           for d in importlib.metadata.distributions(path=[str(site)])}
    assert eps == {LOSS_DIST: {("mmfw", "dcl", "mmfw_dcl.plugin")},
                   ENCODER_DIST: {("mmfw", "cnn-encoders", "mmfw_cnn_encoders.plugin")}}


def test_mmfw_list_shows_them_with_their_distribution(site, tmp_path):
    proc = mmfw_cli(site, "list", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith("  ")}
    assert f"from distribution {LOSS_DIST}" in lines["dcl"]
    assert "mmfw_dcl.plugin" in lines["dcl"]
    for name in ("cnn-vision", "gru-text"):
        assert f"from distribution {ENCODER_DIST}" in lines[name]
    assert "from distribution mmfw)" in lines["infonce"]  # the built-ins are still there


def test_a_recipe_trains_with_them_and_the_run_reloads(site, tmp_path, write_recipe):
    recipe = write_recipe(contrib_recipe(tmp_path / "runs"))
    assert_user_error(cli("check", recipe), "unknown encoder 'cnn-vision'")  # not in the core

    proc = mmfw_cli(site, "run", recipe, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "runs" / "contrib"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert list(metrics) == list(METRIC_KEYS)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    train = [r for r in rows if r["type"] == "train"]
    final = [r for r in rows if r.get("final")]
    assert len(final) == 1 and train[-1]["step"] == final[0]["step"] > 0  # trained to the end
    assert all(math.isfinite(r["loss"]) and {"loss/i2t", "loss/t2i"} <= set(r) for r in train)
    vocab = json.loads((run_dir / "assets" / "text" / "vocab.json").read_text())["words"]
    assert vocab[:4] == ["<pad>", "<unk>", "<start>", "<end>"] and "circle" in vocab

    again = mmfw_cli(site, "eval", run_dir, cwd=tmp_path)  # loads the vocabulary back
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads(again.stdout[again.stdout.index("{"):]) == metrics


# ---- the DCL loss: properties ------------------------------------------------------------------

WEIGHTED = pytest.mark.parametrize("weighted", [False, True], ids=["dcl", "dclw"])


@st.composite
def batches(draw, max_b=48, max_d=64, lo=-6.0, hi=6.0):
    """``(image, text, image_ids, text_ids)`` with repeated rows and ids, norms 10^lo..10^hi."""
    b, d = draw(st.integers(1, max_b)), draw(st.integers(1, max_d))
    pool, n_ids = draw(st.integers(1, b)), draw(st.integers(1, b))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    rows = torch.randint(0, pool, (b,), generator=g)
    dirs = torch.nn.functional.normalize(torch.randn(2, pool, d, generator=g), dim=-1)[:, rows]
    norms = 10 ** (lo + (hi - lo) * torch.rand(2, b, 1, generator=g))
    ids = torch.randint(0, n_ids, (b,), generator=g)
    return dirs[0] * norms[0], dirs[1] * norms[1], ids, ids[torch.randperm(b, generator=g)]


def close(a, b):
    torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4)


@WEIGHTED
@fast
@given(data=st.data())
def test_finite_loss_and_gradients(weighted, data):
    image, text, ids, tids = data.draw(batches())
    image.requires_grad_(True)
    text.requires_grad_(True)
    loss = DCL(DCLOptions(weighted=weighted, learn_temperature=True))
    out = loss(image, text, image_ids=ids, text_ids=tids)
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert all(torch.isfinite(v) for v in out.terms.values())
    out.loss.backward()
    assert torch.isfinite(image.grad).all() and torch.isfinite(text.grad).all()
    assert torch.isfinite(loss.temperature.log_scale.grad)


@WEIGHTED
@fast
@given(data=st.data(), e1=st.floats(-3, 3), e2=st.floats(-3, 3))
def test_invariances(weighted, data, e1, e2):
    """Row permutations (with the ids), positive rescaling, swapping the modalities."""
    image, text, ids, tids = data.draw(batches(lo=-2.0, hi=2.0))
    p, q = torch.randperm(len(ids)), torch.randperm(len(ids))
    loss = DCL(DCLOptions(weighted=weighted))
    a = loss(image, text, image_ids=ids, text_ids=tids).loss
    close(a, loss(image[p], text[q], image_ids=ids[p], text_ids=tids[q]).loss)
    close(a, loss(image * 10**e1, text * 10**e2, image_ids=ids, text_ids=tids).loss)
    close(a, loss(text, image, image_ids=tids, text_ids=ids).loss)


@WEIGHTED
@fast
@given(data=st.data())
def test_unique_ids_equal_the_single_positive_form(weighted, data):
    image, text, _, _ = data.draw(batches(lo=-2.0, hi=2.0))
    ids = torch.randperm(len(image)) * 7 + 100
    loss = DCL(DCLOptions(weighted=weighted))
    close(loss(image, text, image_ids=ids, text_ids=ids).loss, loss(image, text).loss)


@WEIGHTED
@pytest.mark.parametrize("seed", [0, 1])
def test_aligned_batch_scores_lower_than_shuffled(weighted, seed):
    image = torch.randn(8, 32, generator=torch.Generator().manual_seed(seed))
    loss = DCL(DCLOptions(weighted=weighted))
    assert loss(image, image.clone()).loss < loss(image, image.roll(1, 0)).loss


def test_anchors_without_a_negative_are_left_out():
    x = torch.randn(4, 8, requires_grad=True)
    same = torch.zeros(4, dtype=torch.long)
    out = DCL()(x, x.flip(0), image_ids=same, text_ids=same)  # every pair positive
    assert out.loss == 0
    out.loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_temperature_is_a_parameter_only_when_learned():
    fixed, learned = DCL(), DCL(DCLOptions(temperature=0.05, learn_temperature=True))
    assert list(fixed.parameters()) == [] and "temperature.log_scale" in fixed.state_dict()
    assert [n for n, _ in learned.named_parameters()] == ["temperature.log_scale"]
    assert learned.temperature.scale().item() == pytest.approx(20.0)
    with torch.no_grad():
        learned.temperature.log_scale.fill_(10.0)
    learned.temperature.clamp_()  # as the trainer does after each step
    assert learned.temperature.scale().item() == pytest.approx(100.0)  # clamped to max_scale


def test_options_are_validated_with_recipe_errors():
    assert build(DCLOptions, {"temperature": 0.2, "weighted": True}).sigma == 0.5
    for bad, key in (({"temperature": 0}, "temperature"), ({"sigma": -1.0}, "sigma"),
                     ({"weigthed": True}, "weigthed"), ({"weighted": "yes"}, "weighted")):
        with pytest.raises(RecipeError) as err:
            build(DCLOptions, bad)
        assert err.value.key == key


# ---- the DCL loss against the paper's formula, written with plain loops -----------------------

IIDS, TIDS = [0, 0, 1, 2, 3], [0, 1, 1, 2, 4]  # repeated ids; image 3 and text 4 unmatched


def reference(image, text, iids, tids, tau, sigma=None):
    """L = 1/2 (L_i2t + L_t2i); per anchor -mean_{p} w_p l_p + log sum_{negatives} e^l."""
    unit = [[x / math.sqrt(sum(y * y for y in r)) for x in r] for r in image.tolist()]
    tunit = [[x / math.sqrt(sum(y * y for y in r)) for x in r] for r in text.tolist()]
    s = [[sum(a * b for a, b in zip(u, v)) for v in tunit] for u in unit]
    pairs = [(i, j) for i in range(len(iids)) for j in range(len(tids)) if iids[i] == tids[j]]
    w = {p: 1.0 for p in pairs}
    if sigma is not None:
        z = sum(math.exp(s[i][j] / sigma) for i, j in pairs)
        w = {(i, j): 2 - len(pairs) * math.exp(s[i][j] / sigma) / z for i, j in pairs}

    def side(n_anchor, n_cand, sim, same, weight):
        vals = []
        for a in range(n_anchor):
            pos = [c for c in range(n_cand) if same(a, c)]
            neg = [c for c in range(n_cand) if not same(a, c)]
            if pos and neg:
                pull = -sum(weight(a, c) * sim(a, c) / tau for c in pos) / len(pos)
                vals.append(pull + math.log(sum(math.exp(sim(a, c) / tau) for c in neg)))
        return sum(vals) / max(len(vals), 1)

    i2t = side(len(iids), len(tids), lambda a, c: s[a][c], lambda a, c: iids[a] == tids[c],
               lambda a, c: w[(a, c)])
    t2i = side(len(tids), len(iids), lambda a, c: s[c][a], lambda a, c: tids[a] == iids[c],
               lambda a, c: w[(c, a)])
    return (i2t + t2i) / 2


@pytest.mark.parametrize(("options", "sigma"), [({}, None), ({"temperature": 0.5}, None),
                                                ({"weighted": True}, 0.5),
                                                ({"weighted": True, "sigma": 0.2}, 0.2)])
@pytest.mark.parametrize("with_ids", [True, False])
def test_matches_the_formula_on_fixed_inputs(options, sigma, with_ids):
    g = torch.Generator().manual_seed(3)
    image, text = torch.randn(5, 3, generator=g) * 2, torch.randn(5, 3, generator=g)
    iids, tids = (IIDS, TIDS) if with_ids else (list(range(5)), list(range(5)))
    loss = DCL(build(DCLOptions, options))
    ids = {"image_ids": torch.tensor(IIDS), "text_ids": torch.tensor(TIDS)} if with_ids else {}
    got = loss(image, text, **ids).loss.item()
    tau = options.get("temperature", 0.1)
    assert got == pytest.approx(reference(image, text, iids, tids, tau, sigma), rel=1e-5)


def test_unequal_batches_with_ids():
    """The engine passes each image once and all its captions: Bi < Bt."""
    g = torch.Generator().manual_seed(4)
    image, text = torch.randn(3, 6, generator=g), torch.randn(5, 6, generator=g)
    iids, tids = [7, 8, 9], [7, 7, 8, 9, 9]
    for weighted, sigma in ((False, None), (True, 0.5)):
        got = DCL(DCLOptions(weighted=weighted))(image, text, image_ids=torch.tensor(iids),
                                                 text_ids=torch.tensor(tids)).loss.item()
        assert got == pytest.approx(reference(image, text, iids, tids, 0.1, sigma), rel=1e-5)
    with pytest.raises(ValueError, match="pass ids"):
        DCL()(image, text)


# ---- the encoders ------------------------------------------------------------------------------

def grouped_in_order(module: torch.nn.Module, groups: dict[str, list[str]]) -> None:
    names = [n for names in groups.values() for n in names]
    assert names == [n for n, _ in module.named_parameters()]  # each once, input to output
    layers = [k for k in groups if k.startswith("layers.")]
    assert list(groups) == ["embeddings", *layers]
    assert layers == [f"layers.{i}" for i in range(len(layers))]


@pytest.mark.parametrize(("options", "dim"), [
    ({}, 256), ({"widths": [8, 24], "blocks": 1, "stem": "imagenet", "norm": "group"}, 24)])
def test_cnn_vision(options, dim):
    enc = encoders.CNNVision(build(encoders.CNNVisionOptions, {"image_size": 32, **options}))
    assert enc.dim == dim and enc.modality == "image"
    pil = Image.new("RGB", (50, 40), "red")
    grey = torch.randint(0, 256, (1, 20, 30), dtype=torch.uint8)
    pixels = torch.stack([enc.preprocess(pil), enc.preprocess(grey)])
    assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == torch.float32
    assert enc(pixels).shape == (2, dim)
    grouped_in_order(enc, enc.named_groups())
    with pytest.raises(RecipeError) as err:
        build(encoders.CNNVisionOptions, {"widths": []})
    assert err.value.key == "widths"


CAPTIONS = ["a red circle left of a blue square.", "Blue square, red circle on its left",
            "a small green star"]


@pytest.mark.parametrize("options", [
    {}, {"pooling": "mean"}, {"bidirectional": True, "layers": 2}])
def test_gru_text(options, tmp_path):
    o = build(encoders.GRUTextOptions, {"vocab_size": 12, "embed_dim": 8, "width": 16,
                                        "max_length": 6, **options})
    enc = encoders.GRUText(o)
    with pytest.raises(RuntimeError, match="prepare"):
        enc.tokenize(CAPTIONS)
    enc.prepare(CAPTIONS)
    assert len(enc.vocab) == 12 and enc.vocab.itos[4:6] == ["a", "blue"]  # by count, then a-z
    tokens = enc.tokenize([*CAPTIONS, ""])
    assert tokens["input_ids"].shape == (4, 6)  # cut to max_length
    assert tokens["input_ids"][3, :2].tolist() == [2, 3]  # an empty caption: <start> <end>
    assert enc(tokens).shape == (4, enc.dim)
    assert enc.dim == 16 * (2 if o.bidirectional else 1)
    grouped_in_order(enc, enc.named_groups())

    enc.eval()  # padding is never read: a caption encodes the same alone or beside longer ones
    alone = enc(enc.tokenize(CAPTIONS[2:]))
    torch.testing.assert_close(enc(tokens)[2:3], alone, rtol=1e-5, atol=1e-6)

    enc.save_assets(tmp_path / "assets")
    fresh = encoders.GRUText(o)
    fresh.load_assets(tmp_path / "assets")
    assert torch.equal(fresh.tokenize(CAPTIONS)["input_ids"], enc.tokenize(CAPTIONS)["input_ids"])
    small = encoders.GRUText(attrs.evolve(o, vocab_size=8))
    with pytest.raises(DataError, match="vocab_size = 8"):
        small.load_assets(tmp_path / "assets")
    with pytest.raises(DataError, match="missing"):
        small.load_assets(tmp_path / "elsewhere")


# ---- the docs quote the real code; contrib is lint-clean and outside the main package ---------

QUOTE = re.compile(r"<!-- quote: (?P<path>\S+) -->\n```\w*\n(?P<code>.*?)```", re.S)


def test_plugin_author_guide_quotes_real_code():
    page = (ROOT / "docs" / "plugin-authors.md").read_text()
    quotes = list(QUOTE.finditer(page))
    assert len(quotes) >= 8
    quoted_files = set()
    for q in quotes:
        path = ROOT / q["path"]
        assert path.is_file(), q["path"]
        assert q["code"] in path.read_text(), f"the guide's quote of {q['path']} is stale"
        quoted_files.add(q["path"])
    for dist in (LOSS_DIST, ENCODER_DIST):
        assert f"contrib/{dist}/pyproject.toml" in quoted_files


ROW = re.compile(r"^\| `(?P<name>\w+)` \| (?P<default>[^|]+) \|", re.M)


def test_loss_reference_lists_every_loss_with_its_real_options():
    page = (ROOT / "docs" / "losses.md").read_text()
    sections = dict(re.findall(r"^## `(\w+)`\n(.*?)(?=^## |\Z)", page, re.M | re.S))
    expected = {n: mmfw.registry.options_class("loss", n) for n in mmfw.available("loss")}
    expected["dcl"] = DCLOptions
    missing = sorted(set(expected) - set(sections))
    assert not missing, f"docs/losses.md has no section for the installed losses {missing}"
    for name, cls in expected.items():
        rows = {m["name"]: m["default"].strip() for m in ROW.finditer(sections[name])}
        real = {r["name"]: r["default"] for r in describe(cls)}
        assert set(rows) == set(real), f"docs/losses.md, `{name}`: options {sorted(real)}"
        for key, default in real.items():
            assert rows[key] == f"`{default}`", f"docs/losses.md, `{name}`.{key}: `{default}`"


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_contrib_is_ruff_clean():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "contrib"], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_main_distribution_does_not_package_contrib():
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    where = config["tool"]["setuptools"]["packages"]["find"]["where"]
    assert "contrib" not in where and not any(w.startswith("contrib") for w in where)

