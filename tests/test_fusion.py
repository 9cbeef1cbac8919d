"""Cross-attention fusion: the ITM head, the itm loss on hard negatives, top-k re-ranking."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mmfw
from helpers import tiny_recipe
from mmfw.errors import MmfwError, RecipeError
from mmfw.eval.retrieval import (
    METRIC_KEYS,
    embed_split_tokens,
    evaluate_split,
    recall_at_k,
    recall_from_ranks,
    rerank_split,
    top_ranks,
)
from mmfw.model import build_model
from mmfw.registry import create

QUIET = {"console": lambda _: None}
FUSION = {"name": "cross-attention", "layers": 1, "heads": 2}
MIXTURE = {"name": "mixture", "terms": [{"name": "infonce"}, {"name": "itm", "weight": 1.0}]}


def _recipe(tmp_path: Path, name: str = "fusion", **sections):
    data = tiny_recipe(tmp_path / "runs", name=name, model={"fusion": FUSION}, loss=MIXTURE,
                       **sections)
    return mmfw.load_recipe(data)


def test_recipe_without_fusion_is_unchanged(tmp_path) -> None:
    recipe = mmfw.load_recipe(tiny_recipe(tmp_path, name="plain"))
    assert recipe.model.fusion is None and "fusion" not in recipe.to_dict()["model"]
    assert build_model(recipe.model).fusion is None


def test_fusion_forward_shapes_and_one_pass_tokens(tmp_path) -> None:
    recipe = _recipe(tmp_path)
    assert recipe.to_dict()["model"]["fusion"]["name"] == "cross-attention"
    model = build_model(recipe.model).eval()
    model.text.prepare(["a red square", "a blue circle", "two green dots"])
    pixels = torch.randn(3, 3, 16, 16)
    tokens = model.text.tokenize(["a red square", "a blue circle on the left", ""])
    img, txt, vt, vm, tt, tm = model(pixels, tokens, with_tokens=True)
    assert img.shape == txt.shape == (3, 32)
    assert vt.shape[:2] == vm.shape and vt.shape[0] == 3 and vt.shape[2] == 32 and vm.all()
    assert tt.shape[:2] == tm.shape == tokens["input_ids"].shape
    # the same pass gives the pooled embedding forward() gives
    plain_img, plain_txt = model(pixels, tokens)
    torch.testing.assert_close(img, plain_img)
    torch.testing.assert_close(txt, plain_txt)
    pairs = (torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 2, 2]))
    logits = model.match_scores(pixels, tokens, pairs)
    assert logits.shape == (4,) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits, model.match_scores((vt, vm), (tt, tm), pairs))
    fusion = {n for n, _ in model.named_parameters() if n.startswith("fusion.")}
    assert {"fusion.itm_token", "fusion.head.weight"} <= fusion
    assert fusion == {f"fusion.{n}" for n, _ in model.fusion.named_parameters()}
    assert logits.std() > 0  # pairs are told apart before any training
    # padding is masked: extra pad tokens on a caption leave its score unchanged
    tt_pad = torch.cat([tt, torch.randn(3, 4, tt.shape[2])], dim=1)
    tm_pad = torch.cat([tm, torch.zeros(3, 4, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(model.match_scores((vt, vm), (tt_pad, tm_pad), pairs), logits)


def test_fusion_width_must_divide_heads() -> None:
    with pytest.raises(mmfw.errors.PluginError, match="divisible by 'heads'"):
        create("adapter", "cross-attention", heads=3, in_dim=32, out_dim=32, other_dim=16)


def _separating(ids: torch.Tensor, sign: float, seen: list):
    def match(rows_i: torch.Tensor, rows_t: torch.Tensor) -> torch.Tensor:
        seen.append((rows_i, rows_t))
        same = (ids[rows_i] == ids[rows_t]).float()
        return sign * 6.0 * (2 * same - 1)
    return match


def test_itm_loss_properties() -> None:
    torch.manual_seed(0)
    itm = create("loss", "itm")
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    v, t = torch.randn(8, 16), torch.randn(8, 16)
    seen: list = []
    good = itm(v, t, image_ids=ids, text_ids=ids, match=_separating(ids, 1.0, seen))
    bad = itm(v, t, image_ids=ids, text_ids=ids, match=_separating(ids, -1.0, []))
    flat = itm(v, t, image_ids=ids, text_ids=ids, match=lambda i, j: torch.zeros(i.numel()))
    assert all(torch.isfinite(x.loss) for x in (good, bad, flat))
    assert good.loss < flat.loss < bad.loss
    assert math.isclose(float(flat.loss), math.log(2), rel_tol=1e-5)
    assert float(good.terms["accuracy"]) == 1.0
    rows_i, _ = seen[0]
    assert rows_i.numel() == 8 + 8 + 8  # positives, a negative per image, one per caption
    # gradients reach the scorer
    w = torch.zeros((), requires_grad=True)
    out = itm(v, t, image_ids=ids, text_ids=ids, match=lambda i, j: w * (i == j).float())
    out.loss.backward()
    assert w.grad is not None and float(w.grad) < 0


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=2, max_size=10), st.integers(0, 2**16))
def test_itm_negatives_are_never_positives(id_list: list[int], seed: int) -> None:
    torch.manual_seed(seed)
    ids = torch.tensor(id_list)
    n = len(id_list)
    seen: list = []
    out = create("loss", "itm")(torch.randn(n, 8), torch.randn(n, 8), image_ids=ids,
                                text_ids=ids, match=_separating(ids, 1.0, seen))
    assert torch.isfinite(out.loss)
    rows_i, rows_t = seen[0]
    same = ids[rows_i] == ids[rows_t]
    n_pos = int(same.sum())
    assert same[:n_pos].all() and not same[n_pos:].any()


def test_itm_hard_negatives_follow_similarity() -> None:
    torch.manual_seed(0)
    ids = torch.arange(6)
    v = torch.eye(6)
    t = torch.eye(6)
    t[1] = v[0] * 0.99 + 0.01 * v[1]  # caption 1 looks like image 0
    picks = []
    itm = create("loss", "itm", temperature=0.01)
    for _ in range(20):
        seen: list = []
        itm(v, t, image_ids=ids, text_ids=ids, match=_separating(ids, 1.0, seen))
        _, rows_t = seen[0]
        picks.append(int(rows_t[6]))  # the negative caption drawn for image 0
    assert picks.count(1) >= 18


def test_itm_scores_only_the_rows_its_scorer_has_tokens_of() -> None:
    """Under torchrun the loss sees the gathered batch but a rank's scorer holds its own rows'
    tokens (``Match.rows``): the loss is then the one of those rows alone, same draws."""
    from mmfw.model import Match

    g = torch.Generator().manual_seed(3)
    v, t = torch.randn(10, 8, generator=g), torch.randn(10, 8, generator=g)
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 5, 6, 7, 8])
    tokens = (torch.randn(10, 3, 32, generator=g), torch.ones(10, 3, dtype=torch.bool))
    head = build_model(_recipe(Path("unused")).model).fusion
    mine = slice(4, 9)
    local = Match(head, (tokens[0][mine], tokens[1][mine]), (tokens[0][mine], tokens[1][mine]))
    itm = create("loss", "itm")
    torch.manual_seed(0)
    want = itm(v[mine], t[mine], image_ids=ids[mine], text_ids=ids[mine], match=local)
    torch.manual_seed(0)
    got = itm(v, t, image_ids=ids, text_ids=ids, match=local.within(mine, mine))
    torch.testing.assert_close(got.loss, want.loss)
    assert got.terms["accuracy"] == want.terms["accuracy"]


def test_itm_without_fusion_says_what_to_add() -> None:
    with pytest.raises(MmfwError, match=r"\[model.fusion\]"):
        create("loss", "itm")(torch.randn(4, 8), torch.randn(4, 8))


def test_fusion_trains_end_to_end_and_reranking_changes_the_ranking(tmp_path) -> None:
    recipe = _recipe(tmp_path, eval={"rerank_top_k": 5})
    result = mmfw.train(recipe, **QUIET)
    assert set(METRIC_KEYS) <= set(result.metrics)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
    train = [r for r in rows if r.get("type") == "train"]
    assert train and all(math.isfinite(r["loss/itm"]) for r in train)
    assert "loss/itm.accuracy" in train[-1] and "loss/infonce" in train[-1]
    evals = [r for r in rows if r.get("type") == "eval"]
    assert evals and all(set(METRIC_KEYS) <= set(r) for r in evals)

    loaded = mmfw.load_run(result.run_dir)
    model = loaded.model
    assert model.fusion is not None
    source = create("dataset", recipe.data.dataset.name, options=recipe.data.dataset.options)
    split = source.split("test")
    plain = evaluate_split(model, split)
    out = rerank_split(model, split, 16)
    assert set(out.metrics) == set(METRIC_KEYS)
    # the plain lists are the dual encoder's ranking, which recall_at_k scores the same way
    img, txt, owner, _, _ = embed_split_tokens(model, split)
    assert recall_from_ranks(*top_ranks(img, txt, 16), owner) == recall_at_k(img, txt, owner)
    assert recall_from_ranks(out.i2t_plain, out.t2i_plain, owner) == plain
    # re-ranking reorders within the top 16 only, and does reorder
    assert torch.equal(out.i2t[:, :16].sort(1).values, out.i2t_plain[:, :16].sort(1).values)
    assert not torch.equal(out.i2t, out.i2t_plain) and not torch.equal(out.t2i, out.t2i_plain)
    assert evaluate_split(model, split, rerank_top_k=16) == out.metrics

    # cost per query: plain ranking vs re-ranking the top 16 (embedding excluded from both)
    queries = out.i2t.shape[0] + out.t2i.shape[0]
    t0 = time.perf_counter()
    top_ranks(img, txt, 16)
    plain_s = time.perf_counter() - t0
    rerank_s = out.seconds["rerank"]
    print(f"\nrerank cost: {queries} queries, plain ranking {1e3 * plain_s / queries:.3f} "
          f"ms/query, ITM re-ranking of top-16 {1e3 * rerank_s / queries:.3f} ms/query "
          f"(embedding with tokens {out.seconds['embed']:.2f} s)")
    assert rerank_s > 0 and plain_s > 0


def test_misconfigurations_are_user_errors(tmp_path) -> None:
    plain = mmfw.load_recipe(tiny_recipe(tmp_path, name="plain"))
    model = build_model(plain.model)
    with pytest.raises(RecipeError, match="rerank_top_k"):
        rerank_split(model, None, 5)
    with pytest.raises(MmfwError, match="no fusion head"):
        model.match_scores(torch.randn(1, 3, 16, 16), {}, (torch.zeros(1), torch.zeros(1)))
    with pytest.raises(RecipeError, match=r"model\.fusion\.name"):
        mmfw.load_recipe(tiny_recipe(tmp_path, model={"fusion": {"layers": 1}}))
    with pytest.raises(MmfwError, match="not supported yet"):
        mmfw.train(_recipe(tmp_path, name="acc", optim={"accumulate": 2}), **QUIET)


def test_pretrained_encoders_expose_token_features(tmp_path) -> None:
    """hf-text, hf-vision and timm-vision give tokens whose pooling is their forward()."""
    import transformers as tf
    from PIL import Image

    torch.manual_seed(0)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red",
                                "square", "blue", "circle"]))
    bert = tmp_path / "bert"
    tf.BertModel(tf.BertConfig(vocab_size=10, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64)).save_pretrained(bert)
    tf.BertTokenizerFast(vocab=str(vocab)).save_pretrained(bert)
    vit = tmp_path / "vit"
    tf.ViTModel(tf.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, image_size=32, patch_size=8),
                add_pooling_layer=False).save_pretrained(vit)
    tf.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(vit)

    text = create("encoder", "hf-text", model=str(bert), pooling="mean").eval()
    tokens = text.tokenize(["a red square", "blue"])
    tt, tm = text.forward_tokens(tokens)
    assert tt.shape == (*tokens["input_ids"].shape, 32) and tm.dtype == torch.bool
    pooled = (tt * tm[..., None]).sum(1) / tm.sum(1, keepdim=True)
    torch.testing.assert_close(pooled, text(tokens))

    vision = create("encoder", "hf-vision", model=str(vit), pooling="cls").eval()
    pixels = vision.preprocess(Image.new("RGB", (40, 40), "red"))[None]
    vt, vm = vision.forward_tokens(pixels)
    assert vt.shape == (1, 1 + 16, 32) and vm.all()
    torch.testing.assert_close(vt[:, 0], vision(pixels))

    cnn = create("encoder", "timm-vision", model="mobilenetv3_small_050", pretrained=False)
    ct, cm = cnn.eval().forward_tokens(cnn.preprocess(Image.new("RGB", (30, 30)))[None])
    assert ct.shape[0] == 1 and ct.shape[2] == cnn.token_dim == 288 != cnn.dim and cm.all()
    head = create("adapter", "cross-attention", layers=1, heads=2, in_dim=32, out_dim=16,
                  other_dim=cnn.token_dim)
    assert head(ct, cm, tt[:1], tm[:1]).shape == (1,)
