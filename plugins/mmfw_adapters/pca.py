"""The ``pca`` adapter: a fixed projection onto the principal components of a sample of the
encoder's training features (the seeds' "dimension reduction", seed 001 §6.2), optionally
whitened, and the ``pca-fit`` callback that fits it before the first step.

An adapter never sees data, so the fit is the callback's: when the run starts it embeds the
first ``sample`` training images and their captions with the *encoders* (the adapter's
inputs), and calls :meth:`PCA.fit` on each tower's ``pca`` adapter. The projection is in
buffers, so checkpoints and ``mmfw.load_run`` restore it; a resumed run does not refit.
"""

from __future__ import annotations

import time
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from mmfw.eval.retrieval import embed_split
from mmfw.spi import Callback, MmfwError, RunContext, option


@attrs.frozen
class PCAOptions:
    whiten: bool = option(False, doc="divide each component by its standard deviation "
                          "(unit variance per output dimension)")
    sample: int = option(2048, doc="training images (with all their captions) the projection "
                         "is fitted on, before the first step", validator=attrs.validators.ge(2))
    eps: float = option(1e-5, doc="whiten: added to each component's variance",
                        validator=attrs.validators.gt(0))


class PCA(nn.Module):
    r"""``y = ((x - \mu) W^\top) \odot s``: :math:`W` the top ``out_dim`` eigenvectors of the
    features' covariance (rows, by decreasing variance), :math:`\mu` their mean, :math:`s = 1`
    or, with ``whiten``, :math:`1/\sqrt{\lambda + \epsilon}`.

    No trainable parameters: the encoders in front of it train (or are frozen), the
    projection stays as fitted. Before :meth:`fit` it keeps the first ``out_dim`` input
    coordinates. ``out_dim`` must not exceed ``in_dim``. Buffers: ``mean``, ``components``,
    ``scale``, ``fitted``.
    """

    Options = PCAOptions

    def __init__(self, options: PCAOptions | None = None, *, in_dim: int, out_dim: int) -> None:
        super().__init__()
        if out_dim > in_dim:
            raise ValueError(f"pca reduces dimensions: model.embed_dim ({out_dim}) exceeds the "
                             f"encoder's width ({in_dim}); use model.adapter.name = 'linear'")
        self.options = options or PCAOptions()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("components", torch.eye(out_dim, in_dim))
        self.register_buffer("scale", torch.ones(out_dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, features: Tensor) -> Tensor:
        """Fit on ``features`` ``[N, in_dim]`` (N >= 2); returns the eigenvalues kept.

        Each component's sign is fixed (its largest-magnitude coefficient positive), so a fit
        is a function of the features alone.
        """
        x = features.detach().double().cpu()
        if x.ndim != 2 or x.shape[1] != self.in_dim or x.shape[0] < 2:
            raise ValueError(f"pca.fit needs [N >= 2, {self.in_dim}] features, got "
                             f"{list(x.shape)}")
        mean = x.mean(0)
        cov = (x - mean).T @ (x - mean) / (x.shape[0] - 1)
        values, vectors = torch.linalg.eigh(cov)  # ascending
        values = values.flip(0)[: self.out_dim].clamp_min(0)
        w = vectors.flip(1)[:, : self.out_dim].T  # [out, in]
        sign = torch.sign(w.gather(1, w.abs().argmax(1, keepdim=True)))
        w = w * torch.where(sign == 0, 1.0, sign)
        scale = (values + self.options.eps).rsqrt() if self.options.whiten \
            else torch.ones_like(values)
        self.load_fit(mean, w, scale)
        return values.float()

    @torch.no_grad()
    def load_fit(self, mean: Tensor, components: Tensor, scale: Tensor) -> None:
        """Install a fitted projection (what :meth:`fit` computed, e.g. on another rank)."""
        self.mean.copy_(mean)
        self.components.copy_(components)
        self.scale.copy_(scale)
        self.fitted.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        return ((x - self.mean.to(x.dtype)) @ self.components.to(x.dtype).T) \
            * self.scale.to(x.dtype)


class _Encoders:
    """What :func:`mmfw.eval.retrieval.embed_split` needs of a model, with the encoders'
    own outputs as the embeddings: the features the adapters receive."""

    def __init__(self, model: nn.Module) -> None:
        self.vision, self.text = model.vision, model.text
        self.model = model

    def eval(self) -> None:
        self.model.eval()

    def encode_image(self, pixels: Tensor) -> Tensor:
        return self.vision(pixels)

    def encode_text(self, tokens: dict[str, Tensor]) -> Tensor:
        return self.text(tokens)


class PCAFit(Callback):
    """Fits the run's ``pca`` adapters on the encoders' features of training samples."""

    order = -50  # before anything embeds with the model (diagnostics' probe, other fits)

    def on_run_start(self, ctx: RunContext) -> None:
        towers = [(name, getattr(ctx.model, f"{name}_adapter", None)) for name in ("vision",
                                                                                   "text")]
        towers = [(n, a) for n, a in towers if isinstance(a, PCA) and not bool(a.fitted)]
        if not towers:
            return
        t0 = time.perf_counter()
        sample = max(a.options.sample for _, a in towers)
        split = ctx.source.split(ctx.recipe.data.train_split)
        fits: Any = None
        with ctx.whole_model() as model:
            if ctx.is_main:
                fits = self._fit(ctx, model, split, sample, [n for n, _ in towers])
        if ctx.world_size > 1 and torch.distributed.is_available() \
                and torch.distributed.is_initialized():
            box = [fits]
            torch.distributed.broadcast_object_list(box, src=0)
            fits = box[0]
        for name, adapter in towers:
            mean, w, scale, values, n = fits[name]
            adapter.load_fit(mean, w, scale)
            kept = float(values.sum() / max(float(fits[f"{name}/total"]), 1e-30))
            ctx.say(f"pca: {name} adapter fitted on {n} training features, "
                    f"{adapter.in_dim} -> {adapter.out_dim} dims, {100 * kept:.1f}% of the "
                    f"variance kept{' (whitened)' if adapter.options.whiten else ''} "
                    f"({time.perf_counter() - t0:.1f}s)")

    @torch.no_grad()
    def _fit(self, ctx: RunContext, model: nn.Module, split: Any, sample: int,
             names: list[str]) -> dict[str, Any]:
        modes = [(m, m.training) for m in model.modules()]
        try:
            img, txt, _ = embed_split(_Encoders(model), split,
                                      batch_size=ctx.recipe.eval.batch_size, device=ctx.device,
                                      autocast=ctx.backend.autocast, max_images=sample)
        finally:
            for m, mode in modes:
                m.training = mode
        out: dict[str, Any] = {}
        for name in names:
            feats = (img if name == "vision" else txt).float().cpu()
            adapter = getattr(model, f"{name}_adapter")
            if feats.shape[0] < 2:
                raise MmfwError(f"pca: the training split has {feats.shape[0]} {name} "
                                "feature(s); fitting needs at least 2")
            probe = PCA(adapter.options, in_dim=adapter.in_dim, out_dim=adapter.out_dim)
            values = probe.fit(feats)
            total = feats.double().var(0).sum()
            out[name] = (probe.mean, probe.components, probe.scale, values, feats.shape[0])
            out[f"{name}/total"] = total
        return out


def pca_fit_callback(options: None = None) -> PCAFit:
    """The ``pca-fit`` callback (no options: the ``pca`` adapter carries them)."""
    return PCAFit()


pca_fit_callback.default = True  # type: ignore[attr-defined]  # inert without a pca adapter
