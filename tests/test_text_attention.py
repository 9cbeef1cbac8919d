"""scratch-text's attention (mmfw_encoders.attention) against nn.TransformerEncoder, and the CPU
backend's bf16 autocast running SDPA's math kernel."""

from __future__ import annotations

import json
import math

import attrs
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import profile

import mmfw
from helpers import tiny_recipe
from mmfw.spi import RecipeError
from mmfw.train.loop import Trainer
from mmfw_encoders.attention import check_layer, encoder_forward, own_kernel, packed_qkv_attention
from mmfw_encoders.scratch import ScratchText, ScratchTextOptions

WIDTH, HEADS, VOCAB, MAX_LEN = 16, 2, 60, 10


def _encoder(pooling: str = "mean", dropout: float = 0.0, seed: int = 0) -> ScratchText:
    torch.manual_seed(seed)
    return ScratchText(ScratchTextOptions(vocab_size=VOCAB, max_length=MAX_LEN, width=WIDTH,
                                          depth=2, heads=HEADS, pooling=pooling, dropout=dropout))


def _tokens(lengths: list[int], length: int = 8) -> dict[str, Tensor]:
    """Random ids, each row padded after its own length (0: a fully padded row)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, VOCAB, (len(lengths), length), generator=g)
    mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    return {"input_ids": ids.masked_fill(~mask, 0), "attention_mask": mask}


def _reference_tokens(enc: ScratchText, tokens: dict[str, Tensor]) -> Tensor:
    """The pre-change forward_tokens: nn.TransformerEncoder on the same module."""
    ids, mask = tokens["input_ids"], tokens["attention_mask"].bool()
    x = enc.embed(ids) + enc.pos[: ids.shape[1]]
    return enc.norm(enc.layers(x, src_key_padding_mask=~mask))


def _grads(enc: ScratchText) -> dict[str, Tensor]:
    out = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
    enc.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("train", [False, True])
def test_outputs_and_gradients_match_transformer_encoder(pooling: str, train: bool) -> None:
    enc = _encoder(pooling).train(train)
    tokens = _tokens([8, 5, 2, 7])
    mask = tokens["attention_mask"]
    head = torch.randn(WIDTH, 3, generator=torch.Generator().manual_seed(2))

    new_tokens, new_mask = enc.forward_tokens(tokens)
    new = enc.pool_tokens(new_tokens, new_mask)
    (new @ head).square().sum().backward()
    new_grads = _grads(enc)

    ref_tokens = _reference_tokens(enc, tokens)
    ref = enc.pool_tokens(ref_tokens, mask)
    (ref @ head).square().sum().backward()
    ref_grads = _grads(enc)

    assert torch.equal(new_mask, mask)
    torch.testing.assert_close(new_tokens[mask], ref_tokens[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new, ref, rtol=1e-5, atol=1e-5)
    if not train:
        torch.testing.assert_close(enc(tokens), new, rtol=0, atol=0)
    assert new_grads.keys() == ref_grads.keys() == {n for n, _ in enc.named_parameters()}
    for name, g in ref_grads.items():  # atol: float32 rounding at the gradient's scale (the
        scale = g.abs().max().item()  # key bias's true gradient is 0: rounding only)
        torch.testing.assert_close(new_grads[name], g, rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_matches_the_fast_path_under_no_grad() -> None:
    """Evaluation runs under no_grad, where nn.TransformerEncoderLayer takes its fused path."""
    enc = _encoder().eval()
    tokens = _tokens([8, 3, 6])
    with torch.no_grad():
        new, mask = enc.forward_tokens(tokens)
        ref = _reference_tokens(enc, tokens)
    torch.testing.assert_close(new[mask], ref[mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_fully_padded_row_is_finite(pooling: str) -> None:
    """The old path gave NaN for an all-padding row under no_grad (its fused eval path) and
    finite values in training; the SDPA path is finite in both, forwards and backwards."""
    enc = _encoder(pooling)
    tokens = _tokens([6, 0, 3])
    for train in (True, False):
        enc.train(train)
        pooled = enc(tokens)
        assert torch.isfinite(pooled).all()
        pooled.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)
        enc.zero_grad(set_to_none=True)
        with torch.no_grad():
            assert torch.isfinite(enc(tokens)).all()
    enc.train()
    with torch.no_grad():  # training mode, as the old path ran it: finite there too
        assert torch.isfinite(enc.pool_tokens(_reference_tokens(enc, tokens),
                                              tokens["attention_mask"])).all()


def test_dropout_is_applied_in_training_only() -> None:
    enc = _encoder(dropout=0.3)
    tokens = _tokens([8, 4])
    enc.train()
    torch.manual_seed(3)
    a = enc(tokens)
    b = enc(tokens)
    assert not torch.allclose(a, b)
    enc.eval()
    torch.testing.assert_close(enc(tokens), enc(tokens), rtol=0, atol=0)
    with torch.no_grad():  # and eval matches the reference with dropout configured
        torch.testing.assert_close(enc(tokens), enc.pool_tokens(
            _reference_tokens(enc, tokens), tokens["attention_mask"]), rtol=1e-5, atol=1e-5)


class _OldScratchText(nn.Module):
    """scratch-text's module layout before the change, built independently of the plugin."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Parameter(torch.randn(MAX_LEN, WIDTH) * 0.02)
        layer = nn.TransformerEncoderLayer(WIDTH, HEADS, WIDTH * 2, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        x = self.norm(self.layers(x, src_key_padding_mask=~mask))
        m = mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def test_state_dict_saved_before_loads(tmp_path) -> None:
    torch.manual_seed(4)
    old = _OldScratchText().train()
    save_file(old.state_dict(), tmp_path / "text.safetensors")
    enc = _encoder(seed=5)
    assert enc.load_state_dict(load_file(tmp_path / "text.safetensors"), strict=True)
    tokens = _tokens([8, 1, 5])
    enc.train()
    torch.testing.assert_close(enc(tokens), old(tokens["input_ids"], tokens["attention_mask"]),
                               rtol=1e-5, atol=1e-5)
    assert list(enc.named_groups()) and enc.named_groups() == _encoder().named_groups()


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_forward_post_norm_relu_and_final_norm(norm_first: bool) -> None:
    torch.manual_seed(6)
    layer = nn.TransformerEncoderLayer(12, 3, 20, dropout=0.0, activation="relu",
                                       batch_first=True, norm_first=norm_first)
    encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(12),
                                    enable_nested_tensor=False).train()
    x = torch.randn(3, 7, 12, requires_grad=True)
    mask = torch.arange(7)[None, :] < torch.tensor([7, 4, 1])[:, None]
    new = encoder_forward(encoder, x, mask[:, None, None, :])
    (gx_new,) = torch.autograd.grad(new[mask].square().sum(), x)
    ref = encoder(x, src_key_padding_mask=~mask)
    (gx_ref,) = torch.autograd.grad(ref[mask].square().sum(), x)
    torch.testing.assert_close(new[mask], ref[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_new, gx_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("train", [False, True])
def test_unpadding_is_exact_and_runs_the_per_token_work_on_real_tokens(pooling: str,
                                                                       train: bool) -> None:
    """``unpad`` (the default) against the padded computation of the same module: the same
    real-token features, pooled embeddings and gradients; the MLP sees only the real tokens
    (zeros stand at the padding of the token features)."""
    packed = _encoder(pooling).train(train)
    padded = _encoder(pooling).train(train)
    padded.options = attrs.evolve(padded.options, unpad=False)
    assert packed.options.unpad
    tokens = _tokens([8, 5, 2, 7, 1, 3], length=10)
    mask = tokens["attention_mask"]
    rows = []
    hook = packed.layers.layers[0].linear1.register_forward_hook(
        lambda _m, args, _out: rows.append(args[0].shape[0]))
    head = torch.randn(WIDTH, 3, generator=torch.Generator().manual_seed(2))
    outs, grads = [], []
    for enc in (packed, padded):
        x, m = enc.forward_tokens(tokens)
        pooled = enc.pool_tokens(x, m)
        (pooled @ head).square().sum().backward()
        outs.append((x, pooled))
        grads.append(_grads(enc))
    hook.remove()
    assert rows == [int(mask.sum())]  # 26 real tokens of 60 positions
    (xp, pp), (xr, pr) = outs
    torch.testing.assert_close(xp[mask], xr[mask], rtol=1e-5, atol=1e-5)
    assert torch.equal(xp[~mask], torch.zeros_like(xp[~mask]))
    torch.testing.assert_close(pp, pr, rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[1].items():
        scale = g.abs().max().item()
        torch.testing.assert_close(grads[0][name], g, rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_check_layer_rejects_sequence_first_layers() -> None:
    with pytest.raises(ValueError, match="batch-first"):
        check_layer(nn.TransformerEncoderLayer(8, 2, 16, batch_first=False))


# CPU backend: SDPA's math kernel (and bf16 autocast) ------------------------------------------


def _sdpa_ops(backend: object) -> set[str]:
    """The attention operators one SDPA forward + backward under ``backend.autocast()`` ran."""
    q = torch.randn(2, 2, 6, 8, requires_grad=True)
    with profile() as prof:
        with backend.autocast():
            y = F.scaled_dot_product_attention(q, q, q)
        y.float().sum().backward()
    return {e.name for e in prof.events() if "scaled_dot_product" in e.name}


def test_bf16_autocast_selects_the_math_kernel() -> None:
    backend = mmfw.create("backend", "cpu", precision="bf16")
    assert backend.options.sdpa == "math" and "math sdpa" in backend.describe()
    context = backend.autocast()
    assert torch.backends.cuda.flash_sdp_enabled()  # nothing happens before `with`
    with context:
        assert not torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert torch.backends.cuda.flash_sdp_enabled() and not torch.is_autocast_enabled("cpu")

    ops = _sdpa_ops(backend)
    assert "aten::_scaled_dot_product_attention_math" in ops
    assert not any("flash" in op for op in ops)


def test_fp32_selects_the_math_kernel_without_autocast() -> None:
    fp32 = mmfw.create("backend", "cpu", precision="fp32")
    assert "math sdpa" in fp32.describe()
    with fp32.autocast():
        assert not torch.backends.cuda.flash_sdp_enabled()
        assert not torch.is_autocast_enabled("cpu")
    assert torch.backends.cuda.flash_sdp_enabled()
    ops = _sdpa_ops(fp32)
    assert "aten::_scaled_dot_product_attention_math" in ops
    assert not any("flash" in op for op in ops)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_sdpa_auto_leaves_torch_to_choose(precision: str) -> None:
    backend = mmfw.create("backend", "cpu", precision=precision, sdpa="auto")
    assert "math sdpa" not in backend.describe()
    with backend.autocast():
        assert torch.backends.cuda.flash_sdp_enabled()
        assert torch.is_autocast_enabled("cpu") == (precision == "bf16")
    assert any("flash" in op for op in _sdpa_ops(backend))


def test_sdpa_option_is_validated(tmp_path) -> None:
    data = tiny_recipe(tmp_path, backend={"precision": "bf16", "sdpa": "flash"})
    with pytest.raises(RecipeError, match="sdpa"):
        mmfw.load_recipe(data)


def test_bf16_training_steps_of_the_tiny_model(tmp_path) -> None:
    recipe = mmfw.load_recipe(tiny_recipe(
        tmp_path / "runs", name="bf16-math", backend={"precision": "bf16"},
        run={"max_steps": 3, "log_every": 1}, eval={"val_split": ""}))
    trainer = Trainer(recipe, console=lambda _: None)
    assert trainer.backend.options.sdpa == "math"
    before = {n: p.detach().clone() for n, p in trainer.model.text.named_parameters()}
    trainer.fit()
    rows = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["type"] == "train"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    after = dict(trainer.model.text.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[n], p) for n, p in after.items())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_checkpointed_towers_recompute_under_the_math_kernel(tmp_path, precision: str) -> None:
    """Activation checkpointing recomputes a layer in the backward pass, outside autocast:
    the backend's step_context keeps the math kernel there, or torch.utils.checkpoint
    finds the recomputed layer saved other tensors than its forward (a CheckpointError).
    The towers' own attention is off: SDPA is what has the two kernels."""
    recipe = mmfw.load_recipe(tiny_recipe(
        tmp_path / "runs", name=f"ckpt-{precision}", backend={"precision": precision},
        model={"vision": {"grad_checkpointing": True, "attention_impl": "sdpa"},
               "text": {"grad_checkpointing": True, "attention_impl": "sdpa"}},
        run={"max_steps": 2, "log_every": 1}, eval={"val_split": ""}))
    trainer = Trainer(recipe, console=lambda _: None)
    with profile() as prof:
        trainer.fit()
    ops = {e.name for e in prof.events() if "scaled_dot_product" in e.name}
    assert "aten::_scaled_dot_product_attention_math" in ops
    assert not any("flash" in op for op in ops)
    rows = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [math.isfinite(r["loss"]) for r in rows if r["type"] == "train"] == [True, True]


def test_unpadded_gradients_are_reproducible_with_several_threads() -> None:
    """A run must be reproducible: the packed path's gradients (positions gathered with
    F.embedding, whose backward keeps its order) are bit-identical from run to run on 2
    threads, where advanced indexing's accumulating backward was not."""
    g = torch.Generator().manual_seed(0)  # quickstart-sized: threads split the work
    ids = torch.randint(4, 2000, (128, 30), generator=g)
    lengths = torch.randint(8, 31, (128,), generator=g)
    mask = torch.arange(30)[None] < lengths[:, None]
    tokens = {"input_ids": ids.masked_fill(~mask, 0), "attention_mask": mask}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = []
        for _ in range(3):
            torch.manual_seed(0)
            enc = ScratchText(ScratchTextOptions()).train()
            enc(tokens).square().sum().backward()
            runs.append(_grads(enc))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        assert all(torch.equal(other[k], runs[0][k]) for k in runs[0]), [
            k for k in runs[0] if not torch.equal(other[k], runs[0][k])]


# mmfw's packed-QKV math attention (attention_impl = "mmfw") ---------------------------------


def _sdpa_reference(qkv: Tensor, heads: int, keep: Tensor | None) -> Tensor:
    b, n, w3 = qkv.shape
    q, k, v = qkv.view(b, n, 3, heads, w3 // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    with sdpa_kernel(SDPBackend.MATH):
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    return y.transpose(1, 2).reshape(b, n, w3 // 3)


@pytest.mark.parametrize("masked", [False, True])
def test_packed_qkv_attention_equals_sdpa_outputs_and_gradients(masked: bool) -> None:
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(6, 11, 3 * 24, generator=g, requires_grad=True)
    keep = None
    if masked:
        lengths = torch.tensor([11, 1, 5, 8, 0, 3])  # row 4: no key at all
        keep = (torch.arange(11)[None] < lengths[:, None])[:, None, None, :]
    grad = torch.randn(6, 11, 24, generator=g)
    want = _sdpa_reference(qkv, 4, keep)
    got = packed_qkv_attention(qkv, 4, keep)
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
    (gw,) = torch.autograd.grad(want, qkv, grad)
    (gg,) = torch.autograd.grad(got, qkv, grad)
    assert torch.allclose(gg, gw, atol=1e-6, rtol=1e-5)
    if masked:  # SDPA's math kernel zeroes a row with no key; so does the packed kernel
        assert torch.isfinite(got).all() and torch.equal(got[4], torch.zeros_like(got[4]))


def test_own_kernel_only_where_it_computes_the_same_thing() -> None:
    x = torch.randn(2, 3, 12)
    with sdpa_kernel(SDPBackend.MATH):
        assert own_kernel(x, 0.0)
        assert own_kernel(x, 0.0, torch.ones(2, 1, 1, 3, dtype=torch.bool))
        assert not own_kernel(x, 0.1)  # dropout on the weights
        assert not own_kernel(x, 0.0, torch.ones(2, 1, 3, 3, dtype=torch.bool))  # causal
        assert not own_kernel(x.bfloat16(), 0.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not own_kernel(x, 0.0)
    assert not own_kernel(x, 0.0)  # torch's own kernel choice (backend.sdpa = "auto")


def _towers(impl: str) -> tuple[nn.Module, nn.Module]:
    from mmfw_encoders.scratch import ScratchVision, ScratchVisionOptions

    torch.manual_seed(0)
    vision = ScratchVision(ScratchVisionOptions(image_size=16, patch_size=4, width=24, depth=2,
                                                heads=4, attention_impl=impl))
    torch.manual_seed(1)
    text = ScratchText(ScratchTextOptions(vocab_size=40, max_length=9, width=24, depth=2,
                                          heads=4, attention_impl=impl))
    return vision, text


@pytest.mark.parametrize("unpad", [True, False])
def test_scratch_towers_train_alike_with_either_attention_impl(unpad: bool) -> None:
    pixels = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    ids = torch.randint(4, 40, (5, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.arange(9)[None] < torch.tensor([9, 2, 5, 7, 3])[:, None]
    tokens = {"input_ids": ids, "attention_mask": mask}
    backend = mmfw.create("backend", "cpu", precision="fp32")  # math kernel: where "mmfw" applies
    results = {}
    for impl in ("mmfw", "sdpa"):
        vision, text = _towers(impl)
        text.options = attrs.evolve(text.options, unpad=unpad)
        with profile() as prof, backend.step_context():
            with backend.autocast():
                out = vision(pixels).square().sum() + text(tokens).square().sum()
            out.backward()
        ops = {e.name for e in prof.events()}
        results[impl] = (out.detach(), {n: p.grad for n, p in
                                        [*vision.named_parameters(), *text.named_parameters()]})
        sdpa_ran = any("scaled_dot_product" in op for op in ops)
        assert sdpa_ran == (impl == "sdpa"), ops
    (o1, g1), (o2, g2) = results["mmfw"], results["sdpa"]
    assert torch.allclose(o1, o2, rtol=1e-5) and g1.keys() == g2.keys()
    for name in g1:
        assert torch.allclose(g1[name], g2[name], atol=1e-5, rtol=1e-4), name
    # the same parameters under the same names: checkpoints load either way
    assert _towers("mmfw")[0].state_dict().keys() == _towers("sdpa")[0].state_dict().keys()
