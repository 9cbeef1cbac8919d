"""CLIP-exact scratch towers: open_clip's weights of the same shapes load into ``scratch-text``
(causal attention, end-of-text pooling) and ``scratch-vision`` (ln_pre, class token) and give
open_clip's features; CLIP's initialisation has CLIP's scales; a run trains with both."""

from __future__ import annotations

import pytest
import torch

import mmfw
from helpers import tiny_recipe
from mmfw.errors import RecipeError

open_clip = pytest.importorskip("open_clip")

W, HEADS, LAYERS, VOCAB, CONTEXT = 32, 2, 2, 64, 12


def clip_model(quick_gelu: bool) -> torch.nn.Module:
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = CLIP(embed_dim=16,
                 vision_cfg=CLIPVisionCfg(layers=LAYERS, width=W, head_width=W // HEADS,
                                          patch_size=8, image_size=16, mlp_ratio=4.0),
                 text_cfg=CLIPTextCfg(context_length=CONTEXT, vocab_size=VOCAB, width=W,
                                      heads=HEADS, layers=LAYERS, mlp_ratio=4.0),
                 quick_gelu=quick_gelu)
    with torch.no_grad():  # random LayerNorms and biases, so a mapping error cannot hide
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight",
                              "ln_final.weight")):
                p.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
    return model.eval()


def block_map(src: str, dst: str, vision: bool) -> dict[str, str]:
    """open_clip residual block ``src`` -> the scratch tower's block ``dst``."""
    if vision:
        names = {"ln_1": "norm1", "attn.in_proj_weight": "attn.qkv.weight",
                 "attn.in_proj_bias": "attn.qkv.bias", "attn.out_proj": "attn.proj",
                 "ln_2": "norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    else:
        names = {"ln_1": "norm1", "attn.in_proj_weight": "self_attn.in_proj_weight",
                 "attn.in_proj_bias": "self_attn.in_proj_bias",
                 "attn.out_proj": "self_attn.out_proj", "ln_2": "norm2",
                 "mlp.c_fc": "linear1", "mlp.c_proj": "linear2"}
    out = {}
    for a, b in names.items():
        if a.endswith(("_weight", "_bias")):
            out[f"{src}.{a}"] = f"{dst}.{b}"
        else:
            for leaf in ("weight", "bias"):
                out[f"{src}.{a}.{leaf}"] = f"{dst}.{b}.{leaf}"
    return out


def text_tower(activation: str, unpad: bool):
    tower = mmfw.create("encoder", "scratch-text", vocab_size=VOCAB, max_length=CONTEXT,
                        width=W, depth=LAYERS, heads=HEADS, mlp_ratio=4.0, attention="causal",
                        pooling="eot", init="clip", activation=activation, unpad=unpad)
    return tower.eval()


def vision_tower(activation: str):
    tower = mmfw.create("encoder", "scratch-vision", image_size=16, patch_size=8, width=W,
                        depth=LAYERS, heads=HEADS, mlp_ratio=4.0, ln_pre=True, pooling="cls",
                        init="clip", norm_eps=1e-5, activation=activation)
    return tower.eval()


def load_text(tower, clip) -> None:
    sd = clip.state_dict()
    mine = {"embed.weight": sd["token_embedding.weight"], "pos": sd["positional_embedding"],
            "norm.weight": sd["ln_final.weight"], "norm.bias": sd["ln_final.bias"]}
    for i in range(LAYERS):
        for a, b in block_map(f"transformer.resblocks.{i}", f"layers.layers.{i}", False).items():
            mine[b] = sd[a]
    tower.load_state_dict(mine, strict=True)


def load_vision(tower, clip) -> None:
    sd = {k.removeprefix("visual."): v for k, v in clip.state_dict().items()
          if k.startswith("visual.")}
    mine = {"model.cls_token": sd["class_embedding"].view(1, 1, -1),
            "model.pos_embed": sd["positional_embedding"][None],
            "model.patch_embed.proj.weight": sd["conv1.weight"],
            "model.norm_pre.weight": sd["ln_pre.weight"], "model.norm_pre.bias": sd["ln_pre.bias"],
            "model.norm.weight": sd["ln_post.weight"], "model.norm.bias": sd["ln_post.bias"]}
    for i in range(LAYERS):
        for a, b in block_map(f"transformer.resblocks.{i}", f"model.blocks.{i}", True).items():
            mine[b] = sd[a]
    tower.load_state_dict(mine, strict=True)


@pytest.mark.parametrize("quick", [False, True])
def test_open_clip_weights_give_open_clip_features(quick):
    clip = clip_model(quick)
    act = "quick_gelu" if quick else "gelu"
    g = torch.Generator().manual_seed(1)
    # captions of 3..CONTEXT tokens: start token, words, end token (the largest id: CLIP's
    # argmax pooling finds it), zeros after; a caption as long as the context is included
    lengths = torch.tensor([3, 7, CONTEXT, 5])
    ids = torch.zeros(len(lengths), CONTEXT, dtype=torch.long)
    for r, n in enumerate(lengths.tolist()):
        ids[r, :n] = torch.randint(2, VOCAB - 1, (n,), generator=g)
        ids[r, n - 1] = VOCAB - 1
    mask = torch.arange(CONTEXT)[None] < lengths[:, None]
    with torch.no_grad():
        want = clip.encode_text(ids)
        for unpad in (True, False):
            tower = text_tower(act, unpad)
            load_text(tower, clip)
            got = tower({"input_ids": ids, "attention_mask": mask}) @ clip.text_projection
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            # padding, and the tokens after a caption, change nothing
            short = {"input_ids": ids[:1, :3], "attention_mask": mask[:1, :3]}
            torch.testing.assert_close(tower(short) @ clip.text_projection, want[:1],
                                       rtol=1e-4, atol=1e-5)
        pixels = torch.randn(3, 3, 16, 16, generator=g)
        tower = vision_tower(act)
        load_vision(tower, clip)
        torch.testing.assert_close(tower(pixels) @ clip.visual.proj, clip.encode_image(pixels),
                                   rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_clip_init_scales():
    torch.manual_seed(0)
    text = mmfw.create("encoder", "scratch-text", vocab_size=500, width=64, depth=4, heads=4,
                       attention="causal", pooling="eot", init="clip")
    layer = text.layers.layers[0]
    stds = {"pos": text.pos.std(), "embed": text.embed.weight.std(),
            "in": layer.self_attn.in_proj_weight.std(),
            "out": layer.self_attn.out_proj.weight.std(), "fc": layer.linear1.weight.std(),
            "proj": layer.linear2.weight.std()}
    expect = {"pos": 0.01, "embed": 0.02, "in": 64**-0.5, "out": 64**-0.5 * 8**-0.5,
              "fc": 128**-0.5, "proj": 64**-0.5 * 8**-0.5}
    for key, value in expect.items():
        assert abs(float(stds[key]) / value - 1) < 0.15, (key, float(stds[key]), value)
    vision = mmfw.create("encoder", "scratch-vision", width=64, heads=4, ln_pre=True,
                         pooling="cls", init="clip")
    assert abs(float(vision.model.pos_embed.std()) / 64**-0.5 - 1) < 0.15
    assert vision.model.patch_embed.proj.bias is None  # CLIP's conv1 has no bias
    qkv = vision.model.blocks[0].attn.qkv
    assert torch.count_nonzero(qkv.bias) == 0
    bound = (6 / (qkv.weight.shape[0] + qkv.weight.shape[1])) ** 0.5  # Xavier-uniform
    assert float(qkv.weight.abs().max()) <= bound


def test_causal_cls_pooling_is_refused():
    with pytest.raises(RecipeError, match="eot"):
        mmfw.create("encoder", "scratch-text", attention="causal", pooling="cls")


def test_clip_towers_train_from_a_recipe(tmp_path):
    data = tiny_recipe(tmp_path / "runs", name="clip", run={"max_steps": 4},
                       eval={"val_split": ""},
                       model={"vision": {"ln_pre": True, "pooling": "cls", "init": "clip",
                                         "norm_eps": 1e-5, "mlp_ratio": 4.0},
                              "text": {"attention": "causal", "pooling": "eot", "init": "clip",
                                       "mlp_ratio": 4.0}})
    result = mmfw.train(mmfw.load_recipe(data), console=lambda _: None)
    assert 0 <= result.metrics["rsum"] <= 600
    reloaded = mmfw.load_run(tmp_path / "runs" / "clip").model
    assert reloaded.text.options.attention == "causal" and reloaded.vision.options.ln_pre
