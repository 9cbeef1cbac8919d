"""Adapters: identity, linear, mlp, bn-projection; orthogonal initialisation; recipe errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mmfw
from helpers import tiny_recipe
from mmfw.errors import PluginError, RecipeError

LINEAR_ADAPTERS = ("linear", "mlp", "bn-projection")


def _linears(adapter: nn.Module) -> list[nn.Linear]:
    return [m for m in adapter.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("name", ("identity", *LINEAR_ADAPTERS))
def test_shapes_and_gradients(name):
    torch.manual_seed(0)
    out_dim = 24 if name == "identity" else 16
    adapter = mmfw.create("adapter", name, in_dim=24, out_dim=out_dim)
    x = torch.randn(8, 24, requires_grad=True)
    y = adapter(x)
    assert y.shape == (8, out_dim) and torch.isfinite(y).all()
    assert (adapter.in_dim, adapter.out_dim) == (24, out_dim)
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for p in adapter.parameters():
        assert p.grad is not None


def test_identity_refuses_unequal_widths():
    with pytest.raises(PluginError, match=r"set model.embed_dim = 24"):
        mmfw.create("adapter", "identity", in_dim=24, out_dim=16)


@pytest.mark.parametrize("name", LINEAR_ADAPTERS)
@pytest.mark.parametrize("gain", [1.0, 1.4])
def test_orthogonal_init(name, gain):
    torch.manual_seed(0)
    adapter = mmfw.create("adapter", name, in_dim=32, out_dim=16, orthogonal=True, gain=gain)
    for layer in _linears(adapter):
        w = layer.weight.detach()  # [out, in]: rows orthonormal (times gain) when out <= in
        small = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        assert torch.allclose(small, gain**2 * torch.eye(small.shape[0]), atol=1e-5)
        if layer.bias is not None:
            assert torch.count_nonzero(layer.bias) == 0


def test_normal_init_scale():
    torch.manual_seed(0)
    adapter = mmfw.create("adapter", "linear", in_dim=400, out_dim=300, gain=2.0)
    std = adapter.proj.weight.std().item()
    assert abs(std - 2.0 / 400**0.5) < 0.01


def test_mlp_structure():
    adapter = mmfw.create("adapter", "mlp", in_dim=24, out_dim=8, layers=3, hidden=40,
                          activation="silu", dropout=0.2, layer_norm=True, bias=False)
    kinds = [type(m).__name__ for m in adapter.net]
    assert kinds == ["Linear", "LayerNorm", "SiLU", "Dropout"] * 2 + ["Linear"]
    assert [(m.in_features, m.out_features) for m in _linears(adapter)] == [(24, 40), (40, 40),
                                                                           (40, 8)]
    assert all(m.bias is None for m in _linears(adapter))
    one = mmfw.create("adapter", "mlp", in_dim=24, out_dim=8, layers=1)
    assert [type(m).__name__ for m in one.net] == ["Linear"]
    default = mmfw.create("adapter", "mlp", in_dim=24, out_dim=8)
    assert [(m.in_features, m.out_features) for m in _linears(default)] == [(24, 24), (24, 8)]
    assert isinstance(default.net[1], nn.GELU)


def test_mlp_dropout_only_in_training():
    torch.manual_seed(0)
    adapter = mmfw.create("adapter", "mlp", in_dim=16, out_dim=8, dropout=0.5)
    x = torch.randn(4, 16)
    adapter.eval()
    assert torch.equal(adapter(x), adapter(x))
    adapter.train()
    assert not torch.equal(adapter(x), adapter(x))


def test_bn_projection_standardises_the_batch():
    torch.manual_seed(0)
    adapter = mmfw.create("adapter", "bn-projection", in_dim=32, out_dim=16)
    x = torch.randn(256, 32) * 5 + 3  # shifted and scaled features
    y = adapter.train()(x)
    assert torch.allclose(y.mean(0), torch.zeros(16), atol=1e-4)
    assert torch.allclose(y.std(0, unbiased=False), torch.ones(16), atol=1e-3)
    assert adapter.norm.running_mean.abs().sum() > 0  # statistics were tracked
    single = adapter(x[:1])  # one row in training: running statistics, no error
    assert single.shape == (1, 16) and torch.isfinite(single).all()
    adapter.eval()
    assert torch.allclose(adapter(x[:1]), single)


def test_bn_projection_options():
    adapter = mmfw.create("adapter", "bn-projection", in_dim=8, out_dim=4, affine=False,
                          bias=True, momentum=0.5, orthogonal=False)
    assert adapter.norm.weight is None and adapter.proj.bias is not None
    assert adapter.norm.momentum == 0.5


@pytest.mark.parametrize("name,options,key", [
    ("mlp", {"layers": 0}, "layers"),
    ("mlp", {"activation": "tanh"}, "activation"),
    ("mlp", {"dropout": 1.0}, "dropout"),
    ("mlp", {"hiden": 8}, "hiden"),
    ("bn-projection", {"momentum": 0.0}, "momentum"),
    ("linear", {"gain": -1.0}, "gain"),
])
def test_option_mistakes_are_recipe_errors(name, options, key):
    data = tiny_recipe("runs")
    data["model"]["adapter"] = {"name": name, **options}
    with pytest.raises(RecipeError) as info:
        mmfw.load_recipe(data)
    assert f"model.adapter.{key}" in str(info.value)


def test_mlp_adapter_in_a_recipe_builds_the_model():
    from mmfw.model import build_model

    data = tiny_recipe("runs")
    data["model"]["adapter"] = {"name": "mlp", "layers": 3, "layer_norm": True,
                                "orthogonal": True}
    model = build_model(mmfw.load_recipe(data).model)
    assert len(_linears(model.vision_adapter)) == 3
    assert model.vision_adapter is not model.text_adapter
    pixels = torch.stack([model.vision.preprocess(torch.zeros(3, 16, 16, dtype=torch.uint8))])
    assert model.encode_image(pixels).shape == (1, 32)
