"""Zero-shot classification: CLIP's protocol (Radford et al. 2021, "Learning Transferable
Visual Models From Natural Language Supervision", §3.1.4), computed as CLIP_benchmark's
``zeroshot_classification`` does.

Each class is described by prompts (templates with ``{c}`` standing for the class name); its
embedding is the normalised mean of the normalised prompt embeddings. An image is assigned the
classes of highest cosine similarity. Reported in percent: top-1 and top-5 accuracy (top-5
only with at least 5 classes, where CLIP_benchmark reports NaN) and the mean per-class recall
(balanced accuracy: the mean over the classes present of the share of their images classified
right).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config.recipe import Recipe, ZeroShotConfig
from ..data.datasource import BadData, Prepared
from ..registry import create, make_options
from ..spi.contracts import LabelledSplit, Problem
from ..spi.errors import DataError, MmfwError, RecipeError
from .retrieval import embed_options, embed_split

METRIC_KEYS = ("zeroshot/top1", "zeroshot/top5", "zeroshot/mean_per_class")

#: the 80 ImageNet prompt templates of CLIP (Radford et al. 2021; the openai/CLIP repository's
#: notebooks/Prompt_Engineering_for_ImageNet.ipynb), in their order
CLIP_TEMPLATES = (
    'a bad photo of a {c}.', 'a photo of many {c}.', 'a sculpture of a {c}.',
    'a photo of the hard to see {c}.', 'a low resolution photo of the {c}.',
    'a rendering of a {c}.', 'graffiti of a {c}.', 'a bad photo of the {c}.',
    'a cropped photo of the {c}.', 'a tattoo of a {c}.', 'the embroidered {c}.',
    'a photo of a hard to see {c}.', 'a bright photo of a {c}.', 'a photo of a clean {c}.',
    'a photo of a dirty {c}.', 'a dark photo of the {c}.', 'a drawing of a {c}.',
    'a photo of my {c}.', 'the plastic {c}.', 'a photo of the cool {c}.',
    'a close-up photo of a {c}.', 'a black and white photo of the {c}.',
    'a painting of the {c}.', 'a painting of a {c}.', 'a pixelated photo of the {c}.',
    'a sculpture of the {c}.', 'a bright photo of the {c}.', 'a cropped photo of a {c}.',
    'a plastic {c}.', 'a photo of the dirty {c}.', 'a jpeg corrupted photo of a {c}.',
    'a blurry photo of the {c}.', 'a photo of the {c}.', 'a good photo of the {c}.',
    'a rendering of the {c}.', 'a {c} in a video game.', 'a photo of one {c}.',
    'a doodle of a {c}.', 'a close-up photo of the {c}.', 'a photo of a {c}.',
    'the origami {c}.', 'the {c} in a video game.', 'a sketch of a {c}.',
    'a doodle of the {c}.', 'a origami {c}.', 'a low resolution photo of a {c}.',
    'the toy {c}.', 'a rendition of the {c}.', 'a photo of the clean {c}.',
    'a photo of a large {c}.', 'a rendition of a {c}.', 'a photo of a nice {c}.',
    'a photo of a weird {c}.', 'a blurry photo of a {c}.', 'a cartoon {c}.', 'art of a {c}.',
    'a sketch of the {c}.', 'a embroidered {c}.', 'a pixelated photo of a {c}.',
    'itap of the {c}.', 'a jpeg corrupted photo of the {c}.', 'a good photo of a {c}.',
    'a plushie {c}.', 'a photo of the nice {c}.', 'a photo of the small {c}.',
    'a photo of the weird {c}.', 'the cartoon {c}.', 'art of the {c}.',
    'a drawing of the {c}.', 'a photo of the large {c}.', 'a black and white photo of a {c}.',
    'the plushie {c}.', 'a dark photo of a {c}.', 'itap of a {c}.', 'graffiti of the {c}.',
    'a toy {c}.', 'itap of my {c}.', 'a photo of a cool {c}.', 'a photo of a small {c}.',
    'a tattoo of the {c}.',
)
#: the 7 of them the same notebook selected as a smaller ensemble that does as well on ImageNet
CLIP_7_TEMPLATES = (
    "itap of a {c}.", "a bad photo of the {c}.", "a origami {c}.", "a photo of the large {c}.",
    "a {c} in a video game.", "art of the {c}.", "a photo of the small {c}.",
)
BUILT_IN_TEMPLATES = {
    "clip": CLIP_TEMPLATES,
    "clip-7": CLIP_7_TEMPLATES,
    "simple": ("a photo of a {c}.",),
}

Autocast = Callable[[], AbstractContextManager[Any]]


def read_lines(path: str | Path, what: str, key: str) -> tuple[str, ...]:
    """The non-empty lines of a text file (class names, templates); a missing file is named."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise RecipeError(f"{what} file not found: {p}", key=key,
                          expected="a text file with one entry a line", given=str(path))
    try:
        lines = tuple(line.strip() for line in p.read_text(encoding="utf-8").splitlines())
    except UnicodeDecodeError as err:
        raise DataError(f"{p}: not UTF-8 text ({err})") from None
    lines = tuple(line for line in lines if line)
    if not lines:
        raise DataError(f"{p}: no {what} in it (one a line)")
    return lines


def resolve_templates(spec: str | Sequence[str], split: Any) -> tuple[str, ...]:
    """``eval.zeroshot.templates``: a list, a built-in name, ``"auto"`` (the split's own
    templates, else CLIP's 80) or a file."""
    key = "eval.zeroshot.templates"
    if not isinstance(spec, str):
        templates = tuple(spec)
    elif spec == "auto":
        own = getattr(split, "templates", None)
        templates = tuple(own) if own else CLIP_TEMPLATES
    elif spec in BUILT_IN_TEMPLATES:
        templates = BUILT_IN_TEMPLATES[spec]
    else:
        if not Path(spec).expanduser().is_file():
            raise RecipeError("neither a built-in template set nor a file", key=key,
                              expected="auto, " + ", ".join(BUILT_IN_TEMPLATES) +
                              ", a file with one template a line, or a list", given=spec)
        templates = read_lines(spec, "template", key)
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise RecipeError("every template needs {c}, where the class name goes", key=key,
                          expected='e.g. "a photo of a {c}."', given=bad[0])
    return templates


def resolve_classnames(spec: str | Sequence[str], split: LabelledSplit,
                       labels: Sequence[int]) -> tuple[str, ...]:
    """Class names by label index: ``eval.zeroshot.classnames`` (a file or a list) replacing
    the split's own, which must then be as many."""
    key = "eval.zeroshot.classnames"
    own = tuple(split.classnames or ())
    if isinstance(spec, str):
        given = read_lines(spec, "class name", key) if spec else ()
    else:
        given = tuple(spec)
    if given and own and len(given) != len(own):
        raise RecipeError(f"the dataset has {len(own)} classes, these names {len(given)}",
                          key=key, expected=f"{len(own)} names, by label index",
                          given=f"{len(given)} names")
    names = given or own
    if not names:
        raise RecipeError("the dataset's labels are bare class indices: name the classes",
                          key=key, expected="a file with one class name a line, by index, or "
                          "a list")
    top = max(labels, default=-1)
    if top >= len(names):
        raise DataError(f"a label is {top}, but there are only {len(names)} class names "
                        f"(eval.zeroshot.classnames or the dataset's)")
    return names


@torch.no_grad()
def class_embeddings(model: Any, classnames: Sequence[str], templates: Sequence[str], *,
                     batch_size: int = 256, device: Any = "cpu",
                     autocast: Autocast | None = None) -> Tensor:
    """``[C, D]``: each class the normalised mean of its normalised prompt embeddings (CLIP's
    prompt ensembling, as CLIP_benchmark's ``zero_shot_classifier``)."""
    ctx = autocast if autocast is not None else contextlib.nullcontext
    prompts = [t.format(c=c) for c in classnames for t in templates]
    out = []
    for s in range(0, len(prompts), batch_size):
        tokens = {k: v.to(device) for k, v in model.text.tokenize(prompts[s:s + batch_size])
                  .items()}
        with ctx():
            out.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    emb = torch.cat(out).view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


def zeroshot_metrics(image_emb: Tensor, labels: Tensor, class_emb: Tensor) -> dict[str, float]:
    """Top-1 / top-5 accuracy and mean per-class recall, in percent, of images ``[N, D]`` with
    labels ``[N]`` against class embeddings ``[C, D]`` (cosine similarity)."""
    logits = F.normalize(image_emb.float(), dim=-1) @ F.normalize(class_emb.float(), dim=-1).T
    labels = labels.to(logits.device).long()
    n, c = logits.shape
    if n == 0:
        raise DataError("zero-shot classification has no image to classify")
    top = logits.topk(min(5, c), dim=1).indices
    hit = top == labels[:, None]
    out = {"zeroshot/top1": 100.0 * int(hit[:, 0].sum()) / n}
    if c >= 5:
        out["zeroshot/top5"] = 100.0 * int(hit[:, :5].any(1).sum()) / n
    # balanced accuracy over the classes that have images (sklearn's balanced_accuracy_score)
    per_class = torch.zeros(c, dtype=torch.float64)
    counts = torch.bincount(labels.cpu(), minlength=c)
    right = torch.bincount(labels.cpu()[hit[:, 0].cpu()], minlength=c)
    present = counts > 0
    per_class[present] = right[present].double() / counts[present].double()
    out["zeroshot/mean_per_class"] = 100.0 * float(per_class[present].mean())
    return out


class ClassifiedView(Prepared):
    """The kept items of a labelled split as ``embed_split`` reads an evaluation split: one
    caption each (its class name; embed_split embeds captions too, and these are short). An
    image that fails to load reaches ``on_error`` in this process (``embed_split`` collects
    it from its loader workers), which raises or records it in ``failed``; a blank stands in
    until the embeddings are made, then it is left out."""

    def __init__(self, split: LabelledSplit, keep: Sequence[int], classnames: Sequence[str],
                 policy: Callable[[Problem], None]) -> None:
        super().__init__(split, keep)
        self.classnames, self.policy = classnames, policy
        self.failed: list[int] = []
        self.on_error = self.failure

    def failure(self, problem: Problem) -> None:
        i = problem.index if problem.index is not None else -1
        j = self.keep[i] if self.keep is not None and 0 <= i < len(self.keep) else None
        self.policy(problem._replace(index=j))  # named by the split's own index
        self.failed.append(i)

    def captions(self, i: int) -> Sequence[str]:
        j = self.keep[i] if self.keep is not None else i
        return (self.classnames[self.split.label(j)],)


def zeroshot_split(recipe: Recipe, config: ZeroShotConfig | None = None
                   ) -> tuple[str, LabelledSplit]:
    """The labelled split ``[eval.zeroshot]`` names (with ``dataset = ""``: of the recipe's
    ``[data]`` dataset, built with its options)."""
    zs = config or recipe.eval.zeroshot
    if not zs.enabled:
        raise RecipeError("zero-shot classification is off in this recipe", key="eval.zeroshot",
                          expected='eval.zeroshot.split (e.g. "zeroshot" of the synthetic set '
                          'with data.zeroshot_images) or eval.zeroshot.dataset = "labelled" '
                          "with options.path")
    if zs.dataset:
        name = zs.dataset
        try:
            options = make_options("dataset", name, zs.options)
        except RecipeError as err:
            raise err.within(prefix="eval.zeroshot.options") from None
    else:
        name, options = recipe.data.dataset.name, recipe.data.dataset.options
    source = create("dataset", name, options=options)
    split = zs.split or "test"
    if split not in source.splits:
        hint = (" (the synthetic set has a 'zeroshot' split with data.zeroshot_images > 0)"
                if split == "zeroshot" else "")
        raise RecipeError(f"dataset '{name}' has no split '{split}'{hint}",
                          key="eval.zeroshot.split", expected="one of " +
                          ", ".join(source.splits), given=split)
    got = source.split(split)
    if not isinstance(got, LabelledSplit):
        raise RecipeError(f"the '{split}' split of dataset '{name}' has no class labels",
                          key="eval.zeroshot.split", expected="a labelled split (label(i), "
                          "classnames), e.g. dataset = \"labelled\"", given=split)
    return split, got


def check_zeroshot(recipe: Recipe, config: ZeroShotConfig | None = None) -> tuple[str, int]:
    """Find ``[eval.zeroshot]``'s split, its class names and templates now (a run checks them
    when it starts, not after training): a line describing them, and the images plus prompts
    the evaluation will embed. Images are scanned later, with the evaluation."""
    zs = config or recipe.eval.zeroshot
    name, split = zeroshot_split(recipe, zs)
    labels = [int(split.label(i)) for i in range(len(split))]
    classes = resolve_classnames(zs.classnames, split, labels)
    templates = resolve_templates(zs.templates, split)
    line = (f"zero-shot: the '{name}' split of {zs.dataset or recipe.data.dataset.name}, "
            f"{len(split)} images, {len(classes)} classes, {len(templates)} templates")
    return line, len(split) + len(classes) * len(templates)


def evaluate_zeroshot(model: Any, recipe: Recipe, *, config: ZeroShotConfig | None = None,
                      run_dir: Path | None = None, say: Callable[[str], None] = print,
                      device: Any = "cpu", autocast: Autocast | None = None,
                      batch_size: int | None = None, main: bool = True) -> dict[str, float]:
    """Zero-shot metrics of ``model`` on the labelled split of ``[eval.zeroshot]``.

    Bad images follow ``data.on_bad`` as in retrieval evaluation: the split is scanned first
    (``data.check``); ``"error"`` stops with the items named, ``"skip"`` leaves them out and
    lists them in ``run_dir``'s skipped.jsonl (``when = "eval"``).
    """
    zs = config or recipe.eval.zeroshot
    name, split = zeroshot_split(recipe, zs)
    label = f"{name} (eval.zeroshot)"
    policy = BadData(recipe.data.on_bad, run_dir, say, main=main, evaluating=True)
    scan = getattr(split, "problems", None)
    problems = scan(recipe.data.check == "full") if callable(scan) else []
    bad = set(policy.scan(label, problems))
    keep = [i for i in range(len(split)) if i not in bad]
    if not keep:
        raise MmfwError(f"the '{name}' split has no usable image for zero-shot "
                        "classification")
    labels = [int(split.label(i)) for i in keep]
    if any(v < 0 for v in labels):
        raise DataError(f"the '{name}' split has a negative class label")
    classnames = resolve_classnames(zs.classnames, split, labels)
    templates = resolve_templates(zs.templates, split)
    bs = batch_size or recipe.eval.batch_size
    model.eval()
    classes = class_embeddings(model, classnames, templates, batch_size=bs, device=device,
                               autocast=autocast)

    def skipped(problem: Problem) -> None:
        if policy.policy == "error":
            policy.evaluation(label, problem)  # raises, naming the image
        policy.scan(label, [problem])  # "skip": named, logged, and left out (not blanked)

    view = ClassifiedView(split, keep, classnames, skipped)
    images, _, _ = embed_split(model, view, batch_size=bs, device=device, autocast=autocast,
                               **embed_options(recipe))
    target = torch.tensor(labels, dtype=torch.long)
    if view.failed:
        ok = torch.ones(len(keep), dtype=torch.bool)
        ok[view.failed] = False
        images, target = images[ok.to(images.device)], target[ok]
    if not len(target):
        raise MmfwError(f"every image of the '{name}' split was left out as bad data")
    return zeroshot_metrics(images, target, classes)


__all__ = ["BUILT_IN_TEMPLATES", "CLIP_7_TEMPLATES", "CLIP_TEMPLATES", "METRIC_KEYS",
           "ClassifiedView", "check_zeroshot", "class_embeddings", "evaluate_zeroshot",
           "read_lines", "resolve_classnames", "resolve_templates", "zeroshot_metrics",
           "zeroshot_split"]
