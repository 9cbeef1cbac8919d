"""Prototypical contrastive learning, ProtoNCE (Li, Zhou, Xiong and Hoi, ICLR 2021), across
modalities: InfoNCE between images and captions plus a pull of every row towards the
prototype of its item's cluster, at several granularities.

The clusters are k-means over the embeddings of the whole training split, computed by the
``prototypes`` callback (:mod:`mmfw_losses.prototypes`) before the first epoch that uses them
and again every ``every_epochs``; the loss only reads them. They live in the loss's buffers, so
checkpoints hold them and ``--resume`` continues with the same prototypes.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfw.spi import (
    LossOutput,
    Temperature,
    learn_temperature_option,
    match_ids,
    max_scale_option,
    option,
    positives,
    soft_cross_entropy,
    temperature_option,
)


def _clusters(instance: Any, attribute: Any, value: tuple[int, ...]) -> None:
    if not value or any(k < 2 for k in value):
        raise ValueError(f"'{attribute.name}' must be a non-empty list of cluster counts >= 2, "
                         f"got {list(value)}")


_ge0, _ge1 = attrs.validators.ge(0), attrs.validators.ge(1)


@attrs.frozen
class PrototypicalOptions:
    clusters: tuple[int, ...] = option((100, 250, 500), doc="prototypes of each granularity: "
                                       "one k-means per entry (at most the number of "
                                       "training images)", validator=_clusters)
    temperature: float = temperature_option(0.2, doc="tau of the instance InfoNCE; the "
                                            "prototypes' concentrations are scaled to mean tau")
    learn_temperature: bool = learn_temperature_option(False, doc="learn the instance tau")
    max_scale: float = max_scale_option()
    proto_weight: float = option(1.0, doc="weight of the ProtoNCE term (the paper: 1)",
                                 validator=_ge0)
    warmup_epochs: int = option(1, doc="epochs of instance-only training before the first "
                                "clustering (the paper: 20 of 200)", validator=_ge0)
    every_epochs: int = option(1, doc="re-cluster every N epochs after that (the paper: 1)",
                               validator=_ge1)
    features: Literal["joint", "image", "text"] = option(
        "joint", doc="what is clustered per training image: its embedding plus the mean of "
        "its captions' (joint), or one modality's")
    iterations: int = option(20, doc="Lloyd iterations of each k-means (the paper: 20)",
                             validator=_ge1)
    alpha: float = option(10.0, doc="smoothing alpha of the concentration estimate",
                          validator=attrs.validators.gt(0))


# ---- k-means and the concentration estimate ----------------------------------------------

def kmeans(x: Tensor, k: int, iterations: int = 20, generator: torch.Generator | None = None
           ) -> tuple[Tensor, Tensor]:
    """Euclidean k-means of the rows of ``x`` ``[N, D]``: ``(centroids [k, D], assign [N])``.

    k-means++ seeding, then at most ``iterations`` Lloyd steps (fewer once the assignment no
    longer changes); an empty cluster is re-seeded with the point farthest from its centroid.
    Deterministic for a given ``generator`` (CPU).
    """
    x = x.float()
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means of {n} points into {k} clusters")
    xx = x.square().sum(1)

    def nearest(c: Tensor) -> Tensor:  # argmin_j ||x - c_j||^2, by one matrix product
        return (xx.view(-1, 1) - 2 * x @ c.T + c.square().sum(1).view(1, -1)).argmin(1)

    first = int(torch.randint(n, (1,), generator=generator))
    chosen = [first]
    d2 = (xx - 2 * x @ x[first] + xx[first]).clamp_min(0)
    for _ in range(1, k):
        total = float(d2.sum())
        if total > 0:
            nxt = int(torch.multinomial(d2 / total, 1, generator=generator))
        else:  # every point sits on a centroid: any point
            nxt = int(torch.randint(n, (1,), generator=generator))
        chosen.append(nxt)
        d2 = torch.minimum(d2, (xx - 2 * x @ x[nxt] + xx[nxt]).clamp_min(0))
    c = x[torch.tensor(chosen)].clone()
    assign = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iterations):
        new = nearest(c)
        if torch.equal(new, assign):  # converged: further steps change nothing
            break
        assign = new
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        c = torch.where(counts.view(-1, 1) > 0, sums / counts.clamp_min(1).view(-1, 1).float(),
                        c)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            far = (x - c[assign]).square().sum(1)
            for e in empty:
                p = int(far.argmax())
                c[e] = x[p]
                far[p] = -1.0
    assign = nearest(c)
    return c, assign


def concentration(x: Tensor, centroids: Tensor, assign: Tensor, *, alpha: float = 10.0,
                  temperature: float = 0.2) -> Tensor:
    r"""The paper's concentration of each cluster (eq. 12) ``[k]``:
    :math:`\phi = \frac{\sum_{z=1}^{Z}\|v_z - c\|_2}{Z \log(Z + \alpha)}` over its :math:`Z`
    members, as the authors' code computes it: a cluster of one point gets the largest
    :math:`\phi` of the others, the values are clipped to their 10th and 90th percentiles,
    then scaled so that their mean is ``temperature``."""
    k = centroids.shape[0]
    dist = (x.float() - centroids[assign].float()).norm(dim=1)
    size = torch.bincount(assign, minlength=k).float()
    total = torch.zeros(k).index_add_(0, assign, dist)
    phi = torch.where(size > 1, total / size.clamp_min(1) / torch.log(size + alpha),
                      torch.zeros(k))
    many = size > 1
    fill = phi[many].max() if bool(many.any()) else torch.tensor(0.0)
    phi = torch.where(many, phi, fill)
    if float(phi.max()) <= 0:  # every cluster a single point (or all points equal)
        phi = torch.ones(k)
    lo, hi = torch.quantile(phi, 0.1), torch.quantile(phi, 0.9)
    phi = phi.clamp(lo, hi)
    return temperature * phi / phi.mean()


# ---- the loss ------------------------------------------------------------------------------

class Prototypical(nn.Module):
    r"""ProtoNCE across modalities (Li et al., ICLR 2021, eq. 11), with multi-positive ids.

    The instance term is ``infonce`` at temperature :math:`\tau`. For granularity
    :math:`m` with prototypes :math:`c^m_1..c^m_{K_m}` (unit vectors) and concentrations
    :math:`\phi^m`, a row :math:`x` (an image, or a caption) of an item whose cluster is
    :math:`s`:

    .. math::
        \ell^m(x) = -\log \frac{\exp(\hat x^\top c^m_s / \phi^m_s)}
                               {\sum_{r=1}^{K_m} \exp(\hat x^\top c^m_r / \phi^m_r)},\qquad
        L = \tfrac12(L_{i2t} + L_{t2i}) + w\,\frac{1}{M}\sum_{m=1}^{M}
            \tfrac12\big(\bar\ell^m_{image} + \bar\ell^m_{text}\big)

    :math:`\bar\ell` is the mean over a modality's rows whose id has a cluster (a side with
    none leaves the other alone). Every prototype is a candidate (the paper samples
    :math:`r` negative prototypes because it has up to 100,000 of them). The cluster of a row
    is looked up by its id: the engine's ids are the training split's image indices, and the
    ``prototypes`` callback clusters every training image (its embedding and its captions')
    under that index. Before the first clustering, and when called without ids, the loss is
    the instance term alone. Terms: ``i2t``, ``t2i``, ``proto``.

    State (buffers, in checkpoints): ``proto_ids`` (sorted ids with a cluster), ``assign``
    ``[M, N]``, ``centroids`` ``[sum K, D]``, ``density`` (the :math:`\phi`), ``sizes``
    (:math:`K_m`), ``clustered_epoch`` (-1: never).
    """

    Options = PrototypicalOptions

    def __init__(self, options: PrototypicalOptions | None = None) -> None:
        super().__init__()
        self.options = o = options or PrototypicalOptions()
        self.temperature = Temperature(o.temperature, o.learn_temperature, o.max_scale)
        m = len(o.clusters)
        self.register_buffer("proto_ids", torch.zeros(0, dtype=torch.long))
        self.register_buffer("assign", torch.zeros(m, 0, dtype=torch.long))
        self.register_buffer("centroids", torch.zeros(0, 0))
        self.register_buffer("density", torch.zeros(0))
        self.register_buffer("sizes", torch.zeros(m, dtype=torch.long))
        self.register_buffer("clustered_epoch", torch.full((), -1, dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("proto_ids", "assign", "centroids", "density"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- the clustering schedule (read by the callback) ------------------------------------
    def due(self, epoch: int) -> bool:
        """Whether the prototypes are (re)computed once ``epoch`` epochs are done."""
        o = self.options
        return epoch >= o.warmup_epochs and (epoch - o.warmup_epochs) % o.every_epochs == 0

    def stale(self, epoch: int) -> bool:
        """After ``epoch`` completed epochs, is a clustering missing (a fresh or resumed run
        whose last due clustering has not happened)?"""
        o = self.options
        if epoch < o.warmup_epochs:
            return False
        last_due = epoch - (epoch - o.warmup_epochs) % o.every_epochs
        return int(self.clustered_epoch) < last_due

    @property
    def clustered(self) -> bool:
        return self.proto_ids.numel() > 0

    @torch.no_grad()
    def set_prototypes(self, ids: Tensor, assign: Tensor, centroids: Tensor, density: Tensor,
                       sizes: Tensor, epoch: int) -> None:
        """Install a clustering: ``ids`` ``[N]`` (any order), ``assign`` ``[M, N]`` (cluster of
        each id, counted within its granularity), ``centroids`` ``[sum K, D]``, ``density``
        ``[sum K]``, ``sizes`` ``[M]``."""
        device = self.sizes.device
        order = ids.argsort()
        self.proto_ids = ids[order].to(device, torch.long)
        self.assign = assign[:, order].to(device, torch.long)
        self.centroids = F.normalize(centroids.float(), dim=1).to(device)
        self.density = density.float().to(device)
        self.sizes = sizes.to(device, torch.long)
        self.clustered_epoch.fill_(epoch)

    @torch.no_grad()
    def cluster(self, features: Tensor, ids: Tensor, *, epoch: int, seed: int = 0) -> list[int]:
        """k-means of ``features`` ``[N, D]`` (one row per id, L2-normalised here) at every
        granularity, concentrations, and :meth:`set_prototypes`. Returns the ``K_m`` used."""
        o = self.options
        x = F.normalize(features.float().cpu(), dim=1)
        n = x.shape[0]
        ks = [min(k, n) for k in o.clusters]
        cents, dens, assigns = [], [], []
        tau = self.temperature.value
        for m, k in enumerate(ks):
            g = torch.Generator().manual_seed(seed * 1000003 + epoch * 101 + m)
            c, a = kmeans(x, k, o.iterations, g)
            dens.append(concentration(x, c, a, alpha=o.alpha, temperature=tau))
            cents.append(c)
            assigns.append(a)
        self.set_prototypes(ids.cpu(), torch.stack(assigns), torch.cat(cents), torch.cat(dens),
                            torch.tensor(ks), epoch)
        return ks

    # -- the loss ------------------------------------------------------------------------------
    def _proto_side(self, x: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Mean over granularities of the mean ProtoNCE of the rows with a cluster; and
        whether any row had one (float 0/1)."""
        table = self.proto_ids
        at = torch.searchsorted(table, ids).clamp(max=table.numel() - 1)
        known = table[at] == ids
        count = known.sum()
        total = x.new_zeros(())
        start = 0
        for m, k in enumerate(self.sizes.tolist()):
            c, phi = self.centroids[start:start + k], self.density[start:start + k]
            start += k
            logits = (x @ c.T.to(x.dtype)) / phi.to(x.dtype)
            target = self.assign[m, at]
            nll = logits.logsumexp(1) - logits.gather(1, target.view(-1, 1)).squeeze(1)
            total = total + torch.where(known, nll, 0.0).sum() / count.clamp_min(1)
        return total / max(len(self.sizes), 1), (count > 0).to(x.dtype)

    def forward(self, image: Tensor, text: Tensor, *, image_ids: Tensor | None = None,
                text_ids: Tensor | None = None, **context) -> LossOutput:
        v, t = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
        logits = self.temperature.scale() * v @ t.T
        pos = positives(v.shape[0], t.shape[0], image_ids, text_ids, logits.device)
        i2t = soft_cross_entropy(logits, pos)
        t2i = soft_cross_entropy(logits.T, pos.T)
        proto = logits.new_zeros(())
        if self.clustered and image_ids is not None:
            iid, tid = match_ids(v.shape[0], t.shape[0], image_ids, text_ids, v.device)
            pv, hv = self._proto_side(v, iid.long())
            pt, ht = self._proto_side(t, tid.long())
            proto = (pv * hv + pt * ht) / (hv + ht).clamp_min(1.0)
        loss = (i2t + t2i) / 2 + self.options.proto_weight * proto
        return LossOutput(loss, {"i2t": i2t.detach(), "t2i": t2i.detach(),
                                 "proto": proto.detach()})


def joint_features(image: Tensor, text: Tensor, owner: Tensor, what: str) -> Tensor:
    """One row per image to cluster: its normalised embedding plus the normalised mean of its
    captions' (``joint``), or one of the two. ``owner[j]`` is caption ``j``'s image."""
    v = F.normalize(image.float(), dim=1)
    caps = torch.zeros_like(v).index_add_(0, owner, F.normalize(text.float(), dim=1))
    t = F.normalize(caps, dim=1)  # an image without captions: zeros
    if what == "image":
        return v
    if what == "text":
        return torch.where(caps.norm(dim=1, keepdim=True) > 0, t, v)
    return F.normalize(v + t, dim=1)


__all__ = ["Prototypical", "PrototypicalOptions", "concentration", "joint_features", "kmeans"]
