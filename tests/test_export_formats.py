"""The hf, open_clip and onnx export formats: a trained run leaves mmfw and gives the same
embeddings in the other library, loaded in a fresh interpreter that never imports mmfw.

Three tiny runs are trained once: transformers towers (ViT + BERT saved with
``save_pretrained``, pooler pooling, linear adapters) for ``hf``, a timm ViT with the same BERT
(mean pooling) for ``open_clip``, and the scratch towers of TINY for ``onnx``. Each format's
parity check is one subprocess that loads the export with that library alone; the parent
compares its L2-normalised embeddings with mmfw's (fp32, max abs diff <= 1e-5; ONNX raw
embeddings <= 1e-4 at two batch sizes and two sequence lengths).
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import attrs
import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from safetensors.torch import load_file

import mmfw
from helpers import SUBPROCESS_ENV, assert_user_error, cli, tiny_recipe

WIDTH = 32
TEXTS = [  # the second batch pads shorter than max_length; the first truncates at it
    ["a small red circle left of a blue square", "blue square, red circle on its left",
     "a green star " * 12],
    ["a star", "two shapes: an orange hexagon"],
]
SHORT = {"epochs": 1, "max_steps": 2}
DATA = {"train_images": 32, "val_images": 8, "test_images": 8}
QUIET = {"eval": {"val_split": ""}, "diagnostics": {"every": 0, "map_points": 0}}  # only steps


def _vocab(path: Path) -> Path:
    words = sorted({w for batch in TEXTS for s in batch for w in re.findall(r"\w+|[^\w\s]", s)})
    chars = sorted({c for w in words for c in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars),
             *words]
    path.write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, mmfw.LoadedRun]:
    """Three trained runs: ``hf`` (ViT + BERT), ``timm`` (timm ViT + BERT), ``scratch``."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    tok = tf.BertTokenizerFast(vocab=str(_vocab(root / "vocab.txt")))
    bert = tf.BertModel(tf.BertConfig(vocab_size=len(tok), hidden_size=WIDTH,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64))
    bert.save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    vit = tf.ViTModel(tf.ViTConfig(hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, image_size=16, patch_size=8))
    vit.save_pretrained(root / "vit")
    tf.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(root / "vit")
    text = {"name": "hf-text", "model": str(root / "bert"), "max_length": 12}
    model = {
        "hf": {"vision": {"name": "hf-vision", "model": str(root / "vit"), "pooling": "pooler"},
               "text": {**text, "pooling": "pooler"}, "adapter": {"name": "linear"}},
        "timm": {"vision": {"name": "timm-vision", "model": "vit_tiny_patch16_224",
                            "pretrained": False,
                            "kwargs": {"img_size": 16, "patch_size": 8, "embed_dim": WIDTH,
                                       "depth": 1, "num_heads": 2}},
                 "text": {**text, "pooling": "mean"}, "adapter": {"name": "linear"}},
        "scratch": {},
    }
    out = {}
    for name, section in model.items():
        data = tiny_recipe(root / "runs", name, run=SHORT, data=DATA, **QUIET)
        data["model"].update(section)  # whole sections: TINY's scratch options do not apply
        result = mmfw.train(mmfw.load_recipe(data), console=lambda _: None)
        out[name] = mmfw.load_run(result.run_dir)
    return out


def variant(run: mmfw.LoadedRun, *, vision: dict[str, Any] | None = None,
            text: dict[str, Any] | None = None, adapter: str | None = None,
            adapters: tuple[torch.nn.Module, torch.nn.Module] | None = None) -> mmfw.LoadedRun:
    """A copy of ``run`` with other tower options or adapters (a recipe and model that
    training would have made), to check mapping rules without training again."""
    model = run.model.__class__(run.model.vision, run.model.text, run.model.vision_adapter,
                                run.model.text_adapter, run.model.fusion)
    rm = run.recipe.model
    changes: dict[str, Any] = {}
    for side, opts in (("vision", vision), ("text", text)):
        if opts:
            section = getattr(rm, side)
            options = attrs.evolve(section.options, **opts)
            changes[side] = attrs.evolve(section, options=options)
            tower = copy.deepcopy(getattr(run.model, side))
            tower.options = options
            if opts.get("pooling", "pooler") != "pooler":
                tower.model.pooler = None  # as the encoder builds it for that pooling
            setattr(model, side, tower)
    if adapter is not None:
        changes["adapter"] = attrs.evolve(rm.adapter, name=adapter)
        model.vision_adapter, model.text_adapter = adapters
    recipe = attrs.evolve(run.recipe, model=attrs.evolve(rm, **changes))
    return attrs.evolve(run, recipe=recipe, model=model.eval())


def pixels() -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(b, 3, 16, 16) for b in (1, 5)]


def mmfw_embeddings(run: mmfw.LoadedRun, normalise: bool = True) -> dict[str, list]:
    with torch.no_grad():
        images = [run.model.encode_image(p) for p in pixels()]
        tokens = [run.model.text.tokenize(t) for t in TEXTS]
        texts = [run.model.encode_text(t) for t in tokens]
    if normalise:
        images = [F.normalize(x, dim=-1) for x in images]
        texts = [F.normalize(x, dim=-1) for x in texts]
    return {"image": images, "text": texts, "ids": [t["input_ids"] for t in tokens]}


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


#: loads every export with its own library alone (transformers, open_clip, onnxruntime) in a
#: new interpreter: one for all formats, since importing torch and the libraries is most of
#: its time, and it imports them while the parent trains; then it reads the folder of its
#: inputs from stdin
SCRIPT = """
import json, sys
import torch
import torch.nn.functional as F
import onnxruntime as ort
import open_clip
from PIL import Image
from transformers import VisionTextDualEncoderModel, VisionTextDualEncoderProcessor

root = sys.stdin.readline().strip()
inp = torch.load(root + '/in.pt')
out = {'hf': [], 'onnx': []}
for folder in inp['hf']:
    model = VisionTextDualEncoderModel.from_pretrained(folder).eval()
    proc = VisionTextDualEncoderProcessor.from_pretrained(folder)
    res = {'image': [], 'text': [], 'ids': [], 'logit_scale': float(model.logit_scale)}
    with torch.no_grad():
        for px in inp['pixels']:
            res['image'].append(F.normalize(model.get_image_features(pixel_values=px)
                                            .pooler_output, dim=-1))
        for texts in inp['texts']:
            tok = proc.tokenizer(texts, padding=True, truncation=True, return_tensors='pt')
            res['ids'].append(tok['input_ids'])
            res['text'].append(F.normalize(model.get_text_features(**tok).pooler_output,
                                           dim=-1))
    images = [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in inp['uint8']]
    res['processed'] = proc(images=images, return_tensors='pt')['pixel_values']
    out['hf'].append(res)

name = 'local-dir:' + inp['open_clip']
model, _, preprocess = open_clip.create_model_and_transforms(name)
model.eval()
tokenizer = open_clip.get_tokenizer(name)
res = {'image': [], 'text': [], 'ids': [], 'logit_scale': float(model.logit_scale),
       'preprocess': dict(model.visual.preprocess_cfg)}
with torch.no_grad():
    for px in inp['pixels']:
        res['image'].append(model.encode_image(px, normalize=True))
    for texts in inp['texts']:
        ids = tokenizer(texts)
        res['ids'].append(ids)
        res['text'].append(model.encode_text(ids, normalize=True))
out['open_clip'] = res

opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
for folder, tokens in inp['onnx']:
    info = json.load(open(folder + '/preprocessing.json'))
    vision = ort.InferenceSession(folder + '/vision.onnx', opts)
    text = ort.InferenceSession(folder + '/text.onnx', opts)
    res = {'image': [], 'text': [], 'size': info['image']['size']}
    for px in inp['pixels']:
        res['image'].append(torch.from_numpy(vision.run(None, {'pixel_values': px.numpy()})[0]))
    for ids, mask in tokens:
        feed = {'input_ids': ids.long().numpy(), 'attention_mask': mask.long().numpy()}
        res['text'].append(torch.from_numpy(text.run(None, feed)[0]))
    out['onnx'].append(res)
out['mmfw_imported'] = any(m.split('.')[0] == 'mmfw' for m in sys.modules)
torch.save(out, root + '/out.pt')
"""


@attrs.frozen
class Exported:
    """The runs exported for the parity checks, and what the fresh interpreter computed."""

    hf: list[tuple[mmfw.LoadedRun, Path]]
    open_clip: tuple[mmfw.LoadedRun, Path]
    onnx: list[tuple[mmfw.LoadedRun, Path]]
    uint8: torch.Tensor
    got: dict[str, Any]


class Fresh(NamedTuple):
    proc: subprocess.Popen
    log: Path  # its stdout and stderr


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fresh]:
    """The fresh interpreter of :data:`SCRIPT`, started before the runs are trained."""
    log = tmp_path_factory.mktemp("fresh") / "output.txt"
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen([sys.executable, "-c", SCRIPT], env=SUBPROCESS_ENV,
                                cwd=log.parent, stdin=subprocess.PIPE, stdout=out,
                                stderr=out, text=True)
    yield Fresh(proc, log)
    if proc.poll() is None:  # a failed fixture never handed it its inputs
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def exported(fresh: Fresh, runs: dict[str, mmfw.LoadedRun],
             tmp_path_factory: pytest.TempPathFactory) -> Exported:
    root = tmp_path_factory.mktemp("exported")
    cls = variant(runs["hf"], vision={"pooling": "cls"})  # exact through an identity pooler
    hf = [(r, mmfw.create("exporter", "hf").export(r, root / f"hf-{tag}"))
          for tag, r in (("pooler", runs["hf"]), ("cls", cls))]
    oc = runs["timm"], mmfw.create("exporter", "open_clip").export(runs["timm"], root / "oc")
    onnx = [(r, mmfw.create("exporter", "onnx").export(r, root / f"onnx-{name}"))
            for name, r in (("scratch", runs["scratch"]), ("hf", runs["hf"]))]
    torch.manual_seed(2)
    uint8 = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    tokens = [[(t["input_ids"], t["attention_mask"]) for t in map(r.model.text.tokenize, TEXTS)]
              for r, _ in onnx]
    inputs = {"pixels": pixels(), "texts": TEXTS, "uint8": uint8,
              "hf": [str(f) for _, f in hf], "open_clip": str(oc[1]),
              "onnx": [(str(f), t) for (_, f), t in zip(onnx, tokens, strict=True)]}
    torch.save(inputs, root / "in.pt")
    fresh.proc.communicate(f"{root}\n", timeout=300)
    assert fresh.proc.returncode == 0, fresh.log.read_text(encoding="utf-8")[-3000:]
    got = torch.load(root / "out.pt")
    assert got["mmfw_imported"] is False
    return Exported(hf, oc, onnx, uint8, got)


# ------------------------------------------------------------------------------------------
# parity: the same embeddings in the other library


def test_hf_export_matches_in_plain_transformers(exported):
    from mmfw_encoders.hf_vision import pipeline_of

    for (run, folder), res in zip(exported.hf, exported.got["hf"], strict=True):
        assert mmfw.create("exporter", "hf").refuse(run) is None
        ref = mmfw_embeddings(run)
        assert all(torch.equal(a, b) for a, b in zip(ref["ids"], res["ids"], strict=True))
        assert max_diff(ref["image"], res["image"]) <= 1e-5
        assert max_diff(ref["text"], res["text"]) <= 1e-5
        # logit_scale is the run's learned log(1/tau), as its checkpoint holds it
        weights = run.run_dir / "checkpoints" / f"step-{run.step:08d}.safetensors"
        tau = float(load_file(weights)["loss.temperature.log_scale"])
        assert res["logit_scale"] == pytest.approx(tau)
        # the saved processor is the run's: the same values, and the same pixels for images
        # already at the input size (resizing is PIL's there, torchvision's in mmfw)
        assert pipeline_of(tf.AutoImageProcessor.from_pretrained(folder)) == \
            run.model.vision.pipeline
        ours = torch.stack([run.model.vision.preprocess(x) for x in exported.uint8])
        assert float((ours - res["processed"]).abs().max()) <= 1e-5


def test_open_clip_export_matches_in_open_clip(exported):
    run, _ = exported.open_clip
    got = exported.got["open_clip"]
    ref = mmfw_embeddings(run)
    for ours, theirs in zip(ref["ids"], got["ids"], strict=True):  # open_clip pads to max
        assert torch.equal(theirs[:, :ours.shape[1]], ours)
        assert (theirs[:, ours.shape[1]:] == run.model.text.tokenizer.pad_token_id).all()
    assert max_diff(ref["image"], got["image"]) <= 1e-5
    assert max_diff(ref["text"], got["text"]) <= 1e-5
    data = run.model.vision.data_config
    assert list(got["preprocess"]["size"]) == list(data["input_size"][1:])
    assert tuple(got["preprocess"]["mean"]) == pytest.approx(tuple(data["mean"]))
    assert tuple(got["preprocess"]["std"]) == pytest.approx(tuple(data["std"]))


def test_onnx_export_matches_pytorch(exported):
    for (run, _), res in zip(exported.onnx, exported.got["onnx"], strict=True):
        ref = mmfw_embeddings(run, normalise=False)
        assert [x.shape[0] for x in ref["image"]] == [1, 5]  # two batch sizes
        assert len({x.shape[1] for x in ref["ids"]}) == 2  # two sequence lengths
        assert max_diff(ref["image"], res["image"]) <= 1e-4
        assert max_diff(ref["text"], res["text"]) <= 1e-4
        assert res["size"] == [16, 16]
    (_, scratch), (_, hf) = exported.onnx
    assert (scratch / "tokenizer" / "tokenizer.json").is_file()  # tokenizers' (scratch-text)
    assert (hf / "tokenizer" / "tokenizer_config.json").is_file()  # transformers'


def with_vision(run: mmfw.LoadedRun, name: str, **options: Any) -> mmfw.LoadedRun:
    """``run`` with another (untrained) image tower, built as the recipe would build it."""
    encoder = mmfw.create("encoder", name, **options).eval()
    m, rm = run.model, run.recipe.model
    model = m.__class__(encoder, m.text, m.vision_adapter, m.text_adapter)
    section = attrs.evolve(rm.vision, name=name, options=encoder.options)
    recipe = attrs.evolve(run.recipe, model=attrs.evolve(rm, vision=section))
    return attrs.evolve(run, recipe=recipe, model=model.eval())


def test_open_clip_maps_scratch_vision_and_timm_mean_pooling(runs, tmp_path):
    """The other image towers the matrix lists for open_clip (checked in this process)."""
    import open_clip

    timm_mean = {"model": "vit_tiny_patch16_224", "pretrained": False, "pooling": "mean",
                 "kwargs": {"img_size": 16, "patch_size": 8, "embed_dim": WIDTH, "depth": 1,
                            "num_heads": 2}}
    clip_vit = {"image_size": 16, "patch_size": 8, "width": WIDTH, "depth": 1, "heads": 2,
                "ln_pre": True, "pooling": "cls", "activation": "quick_gelu"}
    exporter = mmfw.create("exporter", "open_clip")
    for name, options in (("timm-vision", timm_mean), ("scratch-vision", clip_vit)):
        run = with_vision(runs["timm"], name, **options)
        folder = exporter.export(run, tmp_path / name)
        model = open_clip.create_model_and_transforms(f"local-dir:{folder}")[0].eval()
        px = pixels()[1]
        with torch.no_grad():
            ours = F.normalize(run.model.encode_image(px), dim=-1)
            assert float((model.encode_image(px, normalize=True) - ours).abs().max()) <= 1e-5
    eps = with_vision(runs["timm"], "scratch-vision", **{**clip_vit, "norm_eps": 1e-5})
    assert "the vision tower's norm_eps does not map" in exporter.refuse(eps)


# ------------------------------------------------------------------------------------------
# what does not map says why, and where it would go


def test_scratch_run_is_refused_by_hf_and_open_clip(runs):
    run = runs["scratch"]
    hf = mmfw.create("exporter", "hf").refuse(run)
    assert "the vision tower 'scratch-vision' does not map to hf" in hf
    assert hf.endswith("export it with --format mmfw or onnx")
    oc = mmfw.create("exporter", "open_clip").refuse(run)
    assert "the text tower 'scratch-text' does not map to open_clip" in oc
    assert "HFTextEncoder" in oc and oc.endswith("--format mmfw or onnx")


def test_each_format_names_the_others_that_take_the_run(runs):
    hf_run = mmfw.create("exporter", "open_clip").refuse(runs["hf"])
    assert "the vision tower 'hf-vision'" in hf_run and hf_run.endswith("mmfw or hf or onnx")
    timm_run = mmfw.create("exporter", "hf").refuse(runs["timm"])
    assert "the vision tower 'timm-vision'" in timm_run
    assert timm_run.endswith("mmfw or open_clip or onnx")


def test_hf_refuses_what_its_class_cannot_hold(runs):
    run, hf = runs["hf"], mmfw.create("exporter", "hf")
    mean_text = hf.refuse(variant(run, text={"pooling": "mean"}))
    assert "text pooling 'mean'" in mean_text and "pooler_output" in mean_text
    mean_image = hf.refuse(variant(run, vision={"pooling": "mean"}))
    assert "vision pooling 'mean'" in mean_image
    biased = [mmfw.create("adapter", "linear", bias=True, in_dim=WIDTH, out_dim=WIDTH)
              for _ in range(2)]
    bias = hf.refuse(variant(run, adapter="linear", adapters=tuple(biased)))
    assert "the bias of the vision adapter 'linear'" in bias and "bias=False" in bias
    mlp = [mmfw.create("adapter", "mlp", in_dim=WIDTH, out_dim=WIDTH) for _ in range(2)]
    refused = hf.refuse(variant(run, adapter="mlp", adapters=tuple(mlp)))
    assert "the vision adapter 'mlp'" in refused and refused.endswith("--format mmfw or onnx")
    with pytest.raises(mmfw.MmfwError, match="adapter 'mlp'"):
        hf.export(variant(run, adapter="mlp", adapters=tuple(mlp)), Path("/nonexistent"))


def test_open_clip_refuses_a_text_bias(runs):
    biased = [mmfw.create("adapter", "linear", bias=True, in_dim=WIDTH, out_dim=WIDTH)
              for _ in range(2)]
    refused = mmfw.create("exporter", "open_clip").refuse(
        variant(runs["timm"], adapter="linear", adapters=tuple(biased)))
    assert "the bias of the text adapter 'linear'" in refused


def test_a_fusion_head_goes_only_to_the_native_format(runs):
    run = runs["hf"]
    m, rm = run.model, run.recipe.model
    head = mmfw.create("adapter", "cross-attention", in_dim=WIDTH, out_dim=WIDTH,
                       other_dim=WIDTH)
    fused = attrs.evolve(run, model=m.__class__(m.vision, m.text, m.vision_adapter,
                                                m.text_adapter, head),
                         recipe=attrs.evolve(run.recipe, model=attrs.evolve(
                             rm, fusion=attrs.evolve(rm.adapter, name="cross-attention"))))
    for fmt in ("hf", "open_clip", "onnx"):
        reason = mmfw.create("exporter", fmt).refuse(fused)
        assert reason.startswith(f"the [model.fusion] head 'cross-attention' does not map to "
                                 f"{fmt}"), reason
        assert reason.endswith("export it with --format mmfw")


# ------------------------------------------------------------------------------------------
# through the CLI


@pytest.mark.parametrize(("fmt", "run", "files"), [
    ("hf", "hf", ["config.json", "model.safetensors", "processor_config.json",
                  "tokenizer_config.json"]),
    ("open_clip", "timm", ["open_clip_config.json", "open_clip_model.safetensors",
                           "vision/config.json", "text/config.json"]),
    ("onnx", "scratch", ["vision.onnx", "text.onnx", "preprocessing.json"]),
])
def test_cli_export(runs, tmp_path, fmt, run, files):
    out = tmp_path / fmt
    result = cli("export", runs[run].run_dir, "--format", fmt, "--output", out)
    assert result.exit_code == 0, result.output
    for name in files:
        assert (out / name).is_file(), name


def test_cli_export_refusal_is_one_clear_error(runs, tmp_path):
    result = cli("export", runs["scratch"].run_dir, "--format", "hf", "--output", tmp_path / "x")
    assert_user_error(result, "the vision tower 'scratch-vision' does not map to hf",
                      "--format mmfw or onnx")
