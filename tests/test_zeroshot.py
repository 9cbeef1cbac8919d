"""[eval.zeroshot]: zero-shot classification after training and by `mmfw eval --task zeroshot`,
its labelled-image readers, CLIP_benchmark parity (retrieval and classification, run through
the installed clip_benchmark's own code) and bad images under data.on_bad."""

from __future__ import annotations

import json
import struct
import types
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

import mmfw
from helpers import assert_user_error, cli, tiny_recipe
from mmfw.config.recipe import ZeroShotConfig
from mmfw.eval.retrieval import embed_split
from mmfw.eval.zeroshot import (
    CLIP_TEMPLATES,
    METRIC_KEYS,
    class_embeddings,
    evaluate_zeroshot,
    resolve_classnames,
    resolve_templates,
    zeroshot_metrics,
)
from mmfw.spi.errors import DataError, RecipeError

ZS_IMAGES = 60


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> mmfw.LoadedRun:
    """One tiny training with the synthetic zero-shot split on (classes: the 6 shapes)."""
    out = tmp_path_factory.mktemp("zs")
    recipe = tiny_recipe(out, "zs", run={"epochs": 1, "max_steps": 3},
                         data={"train_images": 48, "test_images": 20,
                               "zeroshot_images": ZS_IMAGES},
                         eval={"val_split": "", "zeroshot": {"split": "zeroshot"},
                               # and COCO's 1k protocol in miniature: 5 folds of 4 images
                               "protocol": "coco-1k-5fold", "fold_size": 4})
    from mmfw_callbacks.plots import Plots

    with pytest.MonkeyPatch.context() as mp:  # these tests read metrics, not plots: drawing
        mp.setattr(Plots, "on_run_end", lambda self, ctx, stopped_by: None)  # is most of it
        mmfw.train(mmfw.load_recipe(recipe))
    return mmfw.load_run(out / "zs")


@pytest.fixture(scope="module")
def zs_split(run):
    return mmfw.create("dataset", "synthetic", options=run.recipe.data.dataset.options
                       ).split("zeroshot")


def test_final_evaluation_writes_zeroshot_metrics(run) -> None:
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    assert set(METRIC_KEYS) <= set(metrics)
    assert "rsum" in metrics  # the retrieval keys stay
    from mmfw.eval.protocols import fold_recall

    test = mmfw.create("dataset", "synthetic", options=run.recipe.data.dataset.options
                       ).split("test")
    folds = fold_recall(*embed_split(run.model, test), fold_size=4)
    assert {k: metrics[f"coco1k/{k}"] for k in folds} == pytest.approx(folds)
    rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if r.get("final")]
    assert final and all(final[-1][k] == metrics[k] for k in METRIC_KEYS)
    # `mmfw eval --task zeroshot` measures the same, and retrieval stays the default task
    res = cli("eval", run.run_dir, "--task", "zeroshot")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{"):]) == {k: metrics[k] for k in METRIC_KEYS}
    res = cli("eval", run.run_dir)
    assert res.exit_code == 0, res.output
    assert "zeroshot/top1" not in res.output and "rsum" in res.output
    from mmfw.tools.report import render_report

    assert "zeroshot/mean_per_class" in render_report(run.run_dir)


def test_metrics_match_a_plain_computation(run, zs_split) -> None:
    model = run.model
    templates = zs_split.templates
    classes = class_embeddings(model, zs_split.classnames, templates)
    labels = torch.tensor([zs_split.label(i) for i in range(len(zs_split))])
    img, _, _ = embed_split(model, zs_split)
    got = zeroshot_metrics(img, labels, classes)
    # by hand: prompt embeddings normalised, averaged per class, normalised; argmax cosine
    tok = model.text.tokenize
    with torch.no_grad():
        w = torch.stack([torch.nn.functional.normalize(torch.nn.functional.normalize(
            model.encode_text(tok([t.format(c=c) for t in templates])), dim=-1).mean(0),
            dim=0) for c in zs_split.classnames])
    sims = torch.nn.functional.normalize(img, dim=-1) @ w.T
    order = sims.argsort(dim=1, descending=True)
    top1 = [int(order[i, 0]) == int(labels[i]) for i in range(len(labels))]
    top5 = [int(labels[i]) in order[i, :5].tolist() for i in range(len(labels))]
    recalls = [sum(t for t, y in zip(top1, labels) if y == c) / int((labels == c).sum())
               for c in range(len(zs_split.classnames))]
    assert got["zeroshot/top1"] == pytest.approx(100 * sum(top1) / len(top1))
    assert got["zeroshot/top5"] == pytest.approx(100 * sum(top5) / len(top5))
    assert got["zeroshot/mean_per_class"] == pytest.approx(100 * sum(recalls) / len(recalls))
    # fewer than 5 classes: no top-5 (CLIP_benchmark reports NaN there)
    assert "zeroshot/top5" not in zeroshot_metrics(img, labels % 3, classes[:3])


# ------------------------------------------------------------------------------------------
# CLIP_benchmark parity: its own metric code over the mmfw model


class ClipLike(torch.nn.Module):
    """An mmfw dual encoder as CLIP_benchmark calls a model: encode_image / encode_text."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def encode_image(self, pixels):
        return self.model.encode_image(pixels)

    def encode_text(self, tokens):
        return self.model.encode_text(dict(tokens))


def clip_tokenizer(model):
    from transformers import BatchEncoding  # has .to(device), as CLIP_benchmark needs

    return lambda texts: BatchEncoding(model.text.tokenize(list(texts)))


def test_retrieval_recall_equals_clip_benchmark(run) -> None:
    from clip_benchmark.metrics import zeroshot_retrieval

    split = mmfw.create("dataset", "synthetic", options=run.recipe.data.dataset.options
                        ).split("test")
    pre = run.model.vision.preprocess
    items = [(pre(split[i].image), list(split.captions(i))) for i in range(len(split))]
    assert all(len(c) == 5 for _, c in items)  # several captions per image
    loader = torch.utils.data.DataLoader(
        items, batch_size=10, collate_fn=lambda b: (torch.stack([x for x, _ in b]),
                                                    [c for _, c in b]))
    theirs = zeroshot_retrieval.evaluate(ClipLike(run.model), loader,
                                         clip_tokenizer(run.model), "cpu", amp=False,
                                         recall_k_list=[1, 5, 10])
    ours = mmfw.evaluate(run, device="cpu", console=lambda s: None)  # fp32, as amp=False
    for k in (1, 5, 10):  # their "image_retrieval" is text -> image: our t2i
        assert 100 * theirs[f"image_retrieval_recall@{k}"] == pytest.approx(ours[f"t2i_R@{k}"],
                                                                            abs=1e-4)
        assert 100 * theirs[f"text_retrieval_recall@{k}"] == pytest.approx(ours[f"i2t_R@{k}"],
                                                                           abs=1e-4)


def test_zeroshot_classification_equals_clip_benchmark(run, zs_split) -> None:
    from clip_benchmark.metrics import zeroshot_classification as cb
    from sklearn.metrics import balanced_accuracy_score  # CLIP_benchmark's mean per-class
    model, pre = run.model, run.model.vision.preprocess
    clf = cb.zero_shot_classifier(ClipLike(model), clip_tokenizer(model),
                                  list(zs_split.classnames), list(zs_split.templates), "cpu",
                                  amp=False)
    data = [(pre(zs_split[i].image), zs_split.label(i)) for i in range(len(zs_split))]
    logits, target = cb.run_classification(ClipLike(model), clf,
                                           torch.utils.data.DataLoader(data, batch_size=16),
                                           "cpu", amp=False)
    # its accuracy() fails under NumPy 2 (float() of a 1-element array): top-k by hand
    top = logits.topk(5, dim=1).indices
    acc1 = int((top[:, 0] == target).sum()) / len(target)
    acc5 = int((top == target[:, None]).any(1).sum()) / len(target)
    mean_per_class = balanced_accuracy_score(target, logits.argmax(dim=1))  # as evaluate()
    ours_classes = class_embeddings(model, zs_split.classnames, zs_split.templates)
    assert torch.allclose(clf.T, ours_classes, atol=1e-6)
    ours = evaluate_zeroshot(model, run.recipe, say=lambda s: None)
    assert ours["zeroshot/top1"] == pytest.approx(100 * acc1, abs=1e-6)
    assert ours["zeroshot/top5"] == pytest.approx(100 * acc5, abs=1e-6)
    assert ours["zeroshot/mean_per_class"] == pytest.approx(100 * mean_per_class, abs=1e-6)


# ------------------------------------------------------------------------------------------
# labelled-image readers: the same images in every layout give the same metrics


def _save_images(split, root: Path) -> list[tuple[str, str, int]]:
    """The zero-shot split as PNG files under root/<class>/: (relative path, class, label)."""
    rows = []
    for i in range(len(split)):
        name = split.classnames[split.label(i)]
        rel = f"{name}/{i:03d}.png"
        (root / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(split[i].image.permute(1, 2, 0).numpy()).save(root / rel)
        rows.append((rel, name, split.label(i)))
    return rows


def _tar_shards(split, root: Path, rows) -> None:
    """CLIP_benchmark's classification layout (clip_benchmark_export_wds), lossless webp."""
    import io

    import webdataset

    (root / "test").mkdir(parents=True)
    with webdataset.TarWriter(str(root / "test" / "0.tar")) as sink:
        for i, (_, _, label) in enumerate(rows):
            buf = io.BytesIO()
            Image.fromarray(split[i].image.permute(1, 2, 0).numpy()).save(
                buf, format="webp", lossless=True)
            sink.write({"__key__": f"s{i:07d}", "webp": buf.getvalue(), "cls": label})
    (root / "test" / "nshards.txt").write_text("1\n")
    (root / "classnames.txt").write_text("\n".join(split.classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(split.templates))


def test_every_layout_reads_the_same_labelled_images(run, zs_split, tmp_path) -> None:
    tree = tmp_path / "tree"
    rows = _save_images(zs_split, tree)
    (tmp_path / "named.csv").write_text("image,label\n" + "".join(
        f"tree/{rel},{name}\n" for rel, name, _ in rows))
    (tmp_path / "indexed.jsonl").write_text("".join(
        json.dumps({"file": f"tree/{rel}", "y": y}) + "\n" for rel, _, y in rows))
    _tar_shards(zs_split, tmp_path / "wds", rows)
    templates = tuple(zs_split.templates)
    expected = evaluate_zeroshot(run.model, run.recipe, say=lambda s: None)
    layouts = {
        "tree": ZeroShotConfig(dataset="labelled", options={"path": str(tree)},
                               templates=templates),
        "csv": ZeroShotConfig(dataset="labelled", options={"path": str(tmp_path / "named.csv")},
                              templates=templates),
        "jsonl": ZeroShotConfig(dataset="labelled", classnames=tuple(zs_split.classnames),
                                options={"path": str(tmp_path / "indexed.jsonl"),
                                         "image_column": "file", "label_column": "y"},
                                templates=templates),
        # class names and templates from the folder's classnames.txt and templates file
        "clip_benchmark": ZeroShotConfig(dataset="labelled",
                                         options={"path": str(tmp_path / "wds")}),
    }
    for name, config in layouts.items():
        got = evaluate_zeroshot(run.model, run.recipe, config=config, say=lambda s: None)
        assert got == pytest.approx(expected), name
    # the CLI: --zeroshot overrides [eval.zeroshot], --split picks the labelled split
    res = cli("eval", run.run_dir, "--task", "zeroshot", "--zeroshot", "dataset=labelled",
              "--zeroshot", f"options.path={tmp_path / 'wds'}", "--split", "test")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{"):]) == pytest.approx(expected)


def test_clip_benchmark_retrieval_shards_are_a_dataset(run, tmp_path) -> None:
    """Shards as clip_benchmark's convert_retrieval_dataset writes them (webp + .txt with one
    caption a line, <split>/nshards.txt) read by the webdataset plugin's root option."""
    import io

    import webdataset

    split = mmfw.create("dataset", "synthetic", options=run.recipe.data.dataset.options
                        ).split("test")
    (tmp_path / "test").mkdir()
    for shard, part in enumerate((range(0, 10), range(10, len(split)))):
        with webdataset.TarWriter(str(tmp_path / "test" / f"{shard}.tar")) as sink:
            for i in part:
                buf = io.BytesIO()
                Image.fromarray(split[i].image.permute(1, 2, 0).numpy()).save(
                    buf, format="webp", lossless=True)
                sink.write({"__key__": f"s{i:07d}", "webp": buf.getvalue(),
                            "txt": "\n".join(split.captions(i))})
    (tmp_path / "test" / "nshards.txt").write_text("2\n")
    (tmp_path / "dataset_type.txt").write_text("retrieval\n")
    source = mmfw.create("dataset", "webdataset", root=str(tmp_path))
    assert source.splits == ("test",)
    shards = source.split("test")
    assert len(shards) == len(split)
    assert [list(shards.captions(i)) for i in range(len(split))] == \
        [list(split.captions(i)) for i in range(len(split))]
    from mmfw.eval.retrieval import evaluate_split

    assert evaluate_split(run.model, shards) == evaluate_split(run.model, split)


# ------------------------------------------------------------------------------------------
# bad images follow data.on_bad


def _png_that_fails_to_decode(path: Path) -> None:
    """A PNG whose header and chunk checksums are fine (the quick scan passes it) but whose
    image data is not valid zlib: it fails only when decoded."""
    raw = bytearray(path.read_bytes())
    pos = raw.index(b"IDAT") - 4
    length = struct.unpack(">I", raw[pos:pos + 4])[0]
    data = bytes(b ^ 0x5A for b in raw[pos + 8:pos + 8 + length])
    raw[pos + 8:pos + 8 + length] = data
    raw[pos + 8 + length:pos + 12 + length] = struct.pack(">I", zlib.crc32(b"IDAT" + data))
    path.write_bytes(bytes(raw))


def test_bad_images_are_named_skipped_or_stop(run, zs_split, tmp_path) -> None:
    tree = tmp_path / "tree"
    rows = _save_images(zs_split, tree)
    garbage = tree / rows[0][0]
    garbage.write_bytes(b"not an image at all")
    late = tree / rows[1][0]
    _png_that_fails_to_decode(late)
    args = ("eval", run.run_dir, "--task", "zeroshot", "--zeroshot", "dataset=labelled",
            "--zeroshot", f"options.path={tree}", "--split", "test")
    out = assert_user_error(cli(*args), str(garbage), "on_bad")
    assert "cannot decode" in out
    res = cli(*args, "--data", "on_bad=skip")
    assert res.exit_code == 0, res.output
    assert str(garbage) in res.output and str(late) in res.output
    skipped = [json.loads(line) for line in
               (run.run_dir / "skipped.jsonl").read_text().splitlines()]
    assert {str(garbage), str(late)} <= {r["where"] for r in skipped}
    assert all(r["when"] == "eval" for r in skipped if r["where"] in (str(garbage), str(late)))
    # the metrics count the other images only
    good = tmp_path / "good"
    for rel, _, _ in rows[2:]:
        (good / rel).parent.mkdir(parents=True, exist_ok=True)
        (good / rel).write_bytes((tree / rel).read_bytes())
    expected = evaluate_zeroshot(run.model, run.recipe, say=lambda s: None, config=ZeroShotConfig(
        dataset="labelled", options={"path": str(good)}))
    assert json.loads(res.output[res.output.index("{"):]) == pytest.approx(expected)
    # the late failure alone, with on_bad = "error": named, no traceback
    garbage.unlink()
    out = assert_user_error(cli(*args), str(late), "while evaluating")


# ------------------------------------------------------------------------------------------
# configuration


def test_templates_and_classnames(zs_split, tmp_path) -> None:
    assert len(CLIP_TEMPLATES) == 80 and all("{c}" in t for t in CLIP_TEMPLATES)
    assert resolve_templates("simple", zs_split) == ("a photo of a {c}.",)
    assert resolve_templates("auto", zs_split) == tuple(zs_split.templates)
    assert resolve_templates("auto", object()) == CLIP_TEMPLATES
    assert len(resolve_templates("clip-7", zs_split)) == 7
    f = tmp_path / "t.txt"
    f.write_text("a {c}\n\nthe {c}\n")
    assert resolve_templates(str(f), zs_split) == ("a {c}", "the {c}")
    with pytest.raises(RecipeError, match="neither a built-in"):
        resolve_templates("clipp", zs_split)
    f.write_text("no placeholder\n")
    with pytest.raises(RecipeError, match=r"\{c\}"):
        resolve_templates(str(f), zs_split)
    labels = [zs_split.label(i) for i in range(len(zs_split))]
    names = [f"shape {i}" for i in range(6)]
    assert resolve_classnames(tuple(names), zs_split, labels) == tuple(names)
    with pytest.raises(RecipeError, match="6 classes, these names 2"):
        resolve_classnames(("a", "b"), zs_split, labels)
    with pytest.raises(DataError, match="label is 5"):
        resolve_classnames(("a", "b"), types.SimpleNamespace(classnames=()), labels)


def test_recipe_mistakes_are_clear(tmp_path) -> None:
    def load(zs):
        return mmfw.load_recipe(tiny_recipe(tmp_path, eval={"zeroshot": zs}))

    with pytest.raises(RecipeError, match="labelled") as err:
        load({"dataset": "labeled"})
    assert "eval.zeroshot.dataset" in str(err.value)
    with pytest.raises(RecipeError, match=r"eval\.zeroshot\.options\.format"):
        load({"dataset": "labelled", "options": {"path": "x", "format": "zip"}})
    with pytest.raises(RecipeError, match="options need a dataset"):
        load({"options": {"path": "x"}})
    with pytest.raises(RecipeError, match=r"\{c\}"):
        load({"split": "zeroshot", "templates": ["no placeholder"]})
    assert not load({}).eval.zeroshot.enabled
    quick = mmfw.load_recipe(Path(__file__).parents[1] / "recipes" / "quickstart.toml")
    assert quick.eval.zeroshot.split == "zeroshot" and quick.data.dataset.values()[
        "zeroshot_images"] > 0


def test_a_missing_zeroshot_split_stops_the_run_before_training(tmp_path) -> None:
    import tomli_w

    recipe = tmp_path / "r.toml"
    recipe.write_text(tomli_w.dumps(tiny_recipe(tmp_path, "nozs", eval={
        "val_split": "", "zeroshot": {"split": "zeroshot"}})))
    assert_user_error(cli("run", recipe), "no split 'zeroshot'", "data.zeroshot_images")
    rows = tmp_path / "nozs" / "metrics.jsonl"
    assert not rows.is_file() or '"type": "train"' not in rows.read_text()


def test_table_rows_without_a_label_are_bad_data(run, zs_split, tmp_path) -> None:
    rows = _save_images(zs_split, tmp_path / "tree")
    table = tmp_path / "t.csv"
    table.write_text(f"image,label\ntree/{rows[0][0]},{rows[0][1]}\ntree/{rows[1][0]},\n")
    config = ZeroShotConfig(dataset="labelled", options={"path": str(table)})
    with pytest.raises(DataError, match=r"t\.csv:3: row has no label \('label'\)"):
        evaluate_zeroshot(run.model, run.recipe, config=config, say=lambda s: None)


def test_zeroshot_off_or_unlabelled_split_is_a_user_error(run) -> None:
    assert_user_error(cli("eval", run.run_dir, "--task", "zeroshot", "--split", "test"),
                      "no class labels", "eval.zeroshot.split")
    assert_user_error(cli("eval", run.run_dir, "--task", "zeroshot", "--split", "zeroshott"),
                      "no split 'zeroshott'")
