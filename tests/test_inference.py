"""Using a trained model: ``mmfw.load`` (embeddings equal to evaluation's, bit for bit),
``mmfw export`` (the ``mmfw`` format opens with nothing else; a model card the Hub parses),
``mmfw embed`` / ``mmfw search``, ``mmfw push`` offline, and the errors of damaged inputs.

One tiny run is trained for the whole module; everything else reuses it.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

import mmfw
from helpers import assert_user_error, cli, tiny_recipe
from mmfw.eval.retrieval import embed_split


def to_pil(image: torch.Tensor | Image.Image) -> Image.Image:
    """A dataset item's image (uint8 ``[3, H, W]`` or PIL) as a PIL image."""
    if isinstance(image, Image.Image):
        return image
    return Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("inference")
    # one epoch, no diagnostics or embedding plots: the run only has to exist
    recipe = tiny_recipe(out, run={"epochs": 1}, diagnostics={"every": 0, "map_points": 0})
    return mmfw.train(mmfw.load_recipe(recipe)).run_dir


@pytest.fixture(scope="module")
def reference(run_dir: Path) -> dict:
    """The evaluation path's own embeddings of the test split (``embed_split``, in the
    run's precision: bf16 on a CPU with bf16 matrix instructions, ``backend.precision =
    "auto"``)."""
    run = mmfw.load_run(run_dir)
    ds = run.recipe.data.dataset
    split = mmfw.create("dataset", ds.name, options=ds.options).split("test")
    device, autocast = run.placed()
    img, txt, owner = embed_split(run.model, split, device=device, autocast=autocast)
    images = [split[i].image for i in range(len(split))]
    captions = [c for i in range(len(split)) for c in split.captions(i)]
    return {"img": F.normalize(img, dim=-1), "txt": F.normalize(txt, dim=-1), "owner": owner,
            "images": images, "captions": captions}


@pytest.fixture(scope="module")
def model(run_dir: Path) -> mmfw.Model:
    return mmfw.load(run_dir)


@pytest.fixture(scope="module")
def exported(run_dir: Path) -> Path:
    result = cli("export", run_dir)
    assert result.exit_code == 0, result.output
    out = Path(result.output.strip().splitlines()[-1])
    assert out == run_dir / "export" / "mmfw"
    return out


def test_encodings_equal_the_evaluation_path_bit_for_bit(model: mmfw.Model, reference: dict,
                                                         tmp_path: Path) -> None:
    img = model.encode_images(reference["images"])
    txt = model.encode_texts(reference["captions"])
    assert torch.equal(img, reference["img"])
    assert torch.equal(txt, reference["txt"])
    assert img.dtype == torch.float32 and img.shape == (len(reference["images"]), 32)
    assert torch.allclose(img.norm(dim=-1), torch.ones(len(img)), atol=1e-5)
    # the same images as files in a folder (PNG is lossless): read back in path order
    pil = [to_pil(im) for im in reference["images"]]
    for i, im in enumerate(pil):
        im.save(tmp_path / f"{i:03d}.png")
    from_files = model.encode_images(tmp_path)
    assert torch.equal(from_files, model.encode_images(pil))
    # alone in its batch: the same up to the float sums of another batch shape
    assert torch.allclose(model.encode_images([tmp_path / "003.png"]), from_files[3:4],
                          atol=1e-5)
    assert torch.allclose(from_files, img, atol=1e-5)
    # similarity is the cosine matrix; search ranks it
    sim = model.similarity(reference["images"][:4], reference["captions"][:7])
    assert torch.allclose(sim, img[:4] @ txt[:7].T, atol=1e-6)
    hits = model.search(reference["captions"][0], img, k=5)
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True) and len(hits) == 5
    assert hits[0].index == int((img @ txt[0]).argmax())
    assert math.isclose(hits[0].score, float((img @ txt[0]).max()), rel_tol=1e-5)


def test_precision_progress_and_bad_inputs(run_dir: Path, model: mmfw.Model, reference: dict,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    model.encode_texts(reference["captions"][:3])
    assert "embedding texts" not in capsys.readouterr().err  # short: no bar
    model.encode_texts(reference["captions"][:3], progress=True)
    assert "embedding texts" in capsys.readouterr().err
    bf16 = mmfw.load(run_dir, device="cpu", precision="bf16")
    assert bf16.precision == "bf16"
    low = bf16.encode_texts(reference["captions"][:8])
    cos = (low * reference["txt"][:8]).sum(-1)
    assert low.dtype == torch.float32 and bool((cos > 0.95).all()), cos
    with pytest.raises(mmfw.MmfwError, match="precision must be one of"):
        mmfw.load(run_dir, precision="int3")
    with pytest.raises(mmfw.MmfwError, match="takes strings"):
        model.encode_texts(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(mmfw.DataError, match=r"nowhere\.png"):
        model.encode_images([run_dir / "nowhere.png"])
    with pytest.raises(mmfw.MmfwError, match="not a run directory"):
        mmfw.load(run_dir / "checkpoints")


def test_ensemble_directory_averages_similarities(run_dir: Path, model: mmfw.Model,
                                                  reference: dict, tmp_path: Path) -> None:
    ens = tmp_path / "ens"
    ens.mkdir()
    # an ensemble directory lists its member run directories
    (ens / "ensemble.json").write_text(json.dumps({"members": [str(run_dir)] * 2}))
    both = mmfw.load(ens)
    assert both.kind == "ensemble" and both.embed_dim == 64
    img = both.encode_images(reference["images"][:6])
    txt = both.encode_texts(reference["captions"][:9])
    # two identical members: their averaged cosine is the member's cosine
    assert torch.allclose(img @ txt.T, reference["img"][:6] @ reference["txt"][:9].T,
                          atol=1e-6)
    assert torch.allclose(img.norm(dim=-1), torch.ones(6), atol=1e-5)
    assert_user_error(cli("export", ens), "ensemble directory", "export a member")


def test_native_export_opens_alone_with_a_model_card(exported: Path, run_dir: Path,
                                                     reference: dict, tmp_path: Path) -> None:
    names = {p.name for p in exported.iterdir()}
    assert {"model.safetensors", "mmfw-export.json", "recipe.toml", "metrics.json",
            "README.md", "assets"} <= names
    # moved away from the run: nothing of the run directory is needed
    moved = shutil.copytree(exported, tmp_path / "moved")
    m = mmfw.load(moved)
    assert m.kind == "export"
    assert torch.equal(m.encode_images(reference["images"]), reference["img"])
    assert torch.equal(m.encode_texts(reference["captions"]), reference["txt"])
    # the model card: Hugging Face's format, metrics in its model-index
    card = huggingface_hub.ModelCard.load(moved / "README.md")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert card.data.library_name == "mmfw"
    assert "mmfw" in card.data.tags and card.data.datasets == ["synthetic"]
    got = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert got == {k: round(v, 4) for k, v in metrics.items()}
    assert {r.dataset_split for r in card.data.eval_results} == {"test"}
    for heading in ("## Usage", "## Data", "## Training time and hardware",
                    "## Intended use and limitations"):
        assert heading in card.text
    ran = mmfw.create("backend", "cpu").precision  # "auto" as it resolved on this CPU
    assert f"backend `cpu` ({ran})" in card.text and "20 steps" in card.text
    # a second export replaces the first (it carries the marker); a foreign folder is kept
    assert cli("export", run_dir).exit_code == 0
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert_user_error(cli("export", run_dir, "--output", foreign), "not empty")
    assert_user_error(cli("export", run_dir, "--format", "mmfx"), "mmfw")


@pytest.mark.parametrize(("remove", "named"), [
    ("model.safetensors", "model.safetensors"),
    ("recipe.toml", "recipe.toml"),
    ("assets/text/tokenizer.json", "tokenizer.json"),
    ("mmfw-export.json", "mmfw-export.json"),
])
def test_incomplete_export_names_the_missing_file(exported: Path, tmp_path: Path,
                                                  remove: str, named: str) -> None:
    broken = shutil.copytree(exported, tmp_path / "broken")
    (broken / remove).unlink()
    with pytest.raises(mmfw.MmfwError, match=named.replace(".", r"\.")):
        mmfw.load(broken)
    assert_user_error(cli("embed", broken, "--texts", broken / "README.md", "--output",
                          tmp_path / "x.npy"), named)


def test_damaged_files_are_named(exported: Path, run_dir: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(exported, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(mmfw.MmfwError, match=r"model\.safetensors"):
        mmfw.load(broken)
    run = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("export"))
    (run / "assets" / "text" / "tokenizer.json").unlink()
    assert_user_error(cli("search", run, "--collection", tmp_path / "c.npy", "--text", "x"),
                      "tokenizer.json")


def test_embed_and_search(run_dir: Path, model: mmfw.Model, reference: dict,
                          tmp_path: Path) -> None:
    out = tmp_path / "test.safetensors"
    result = cli("embed", run_dir, "--split", "test", "--output", out)
    assert result.exit_code == 0, result.output
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        emb, ids = f.get_tensor("embeddings"), f.get_tensor("ids")
    assert torch.equal(emb, reference["img"]) and ids.tolist() == list(range(len(emb)))
    assert meta["modality"] == "image" and meta["embed_dim"] == "32"
    assert meta["run"] == str(run_dir)
    # captions as .npy with the ids beside it; ids are the images they describe
    caps = tmp_path / "caps.npy"
    assert cli("embed", run_dir, "--split", "test", "--modality", "text", "--output",
               caps).exit_code == 0
    side = json.loads((tmp_path / "caps.ids.json").read_text())
    assert side["ids"] == reference["owner"].tolist()
    assert side["labels"] == reference["captions"]
    coll = mmfw.Collection.load(caps)
    assert torch.equal(coll.embeddings, reference["txt"])
    # search a caption against the images: the ranking of the model's own search
    query = reference["captions"][5]
    result = cli("search", run_dir, "--collection", out, "--text", query, "-k", "4")
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    expected = model.search(query, mmfw.Collection.load(out), k=4)
    assert [int(line.split()[2]) for line in lines] == [h.id for h in expected]
    assert [line.split()[0] for line in lines] == ["1", "2", "3", "4"]
    # faiss's exact index above the threshold: the same ranking
    faiss = cli("search", run_dir, "--collection", out, "--text", query, "-k", "4",
                "--faiss-above", "0")
    assert [line.split()[2] for line in faiss.output.strip().splitlines()] == \
        [line.split()[2] for line in lines]
    # an image query against the captions: labels are the captions
    png = tmp_path / "q.png"
    to_pil(reference["images"][2]).save(png)
    result = cli("search", run_dir, "--collection", caps, "--image", png, "-k", "3")
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[0].split(None, 3)[3] in reference["captions"]


def test_embed_folder_and_text_file_and_their_errors(run_dir: Path, model: mmfw.Model,
                                                     tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (20, 12), (200, 30, 30)).save(folder / "b.jpg")
    Image.new("RGB", (16, 16), (30, 30, 200)).save(folder / "sub" / "a.png")
    out = tmp_path / "imgs.safetensors"
    assert cli("embed", run_dir, "--images", folder, "--output", out).exit_code == 0
    coll = mmfw.Collection.load(out)
    assert coll.labels == ("b.jpg", "sub/a.png")
    assert torch.equal(coll.embeddings, model.encode_images([folder / "b.jpg",
                                                             folder / "sub" / "a.png"]))
    texts = tmp_path / "q.txt"
    texts.write_text("a red circle\n\nblue square\n", encoding="utf-8")
    assert cli("embed", run_dir, "--texts", texts, "--output", tmp_path / "t.npy").exit_code == 0
    assert mmfw.Collection.load(tmp_path / "t.npy").ids.tolist() == [1, 3]
    # an unreadable image is named with its path
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    assert_user_error(cli("embed", run_dir, "--images", folder, "--output", out),
                      str(folder / "broken.png"))
    # a corrupt collection and one of another width are named
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    assert_user_error(cli("search", run_dir, "--collection", bad, "--text", "x"), str(bad))
    wide = tmp_path / "wide.safetensors"
    mmfw.Collection(torch.zeros(2, 8), torch.arange(2), ("a", "b"), "text", "other").save(wide)
    assert_user_error(cli("search", run_dir, "--collection", wide, "--text", "x"), str(wide),
                      "8-wide")
    assert_user_error(cli("embed", run_dir, "--split", "nope", "--output", out), "no split")
    assert_user_error(cli("embed", run_dir, "--texts", tmp_path / "none.txt", "--output", out),
                      "none.txt")


def test_push_offline_is_one_clear_message(run_dir: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # the Hub switched off, as HF_HUB_OFFLINE=1 does (huggingface_hub reads it at import)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "push"
    result = cli("push", run_dir, "someone/tiny-mmfw", "--output", out)
    assert_user_error(result, "cannot reach the Hugging Face Hub", "(offline?)",
                      "someone/tiny-mmfw")
    assert (out / "mmfw-export.json").is_file()  # the export is there to push later
