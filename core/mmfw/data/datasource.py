"""The dataset as training uses it: bad data handled, images cached, sampler and loader made.

Before training, every split the run will read is checked (``problems()`` of the split, when
it has one) and ``data.on_bad`` is applied: ``"error"`` stops the run with the first problems
and their count; ``"skip"`` leaves the bad items out, writes each one to ``skipped.jsonl`` in
the run directory and says how many on the console. An image that fails to decode later, while
training, goes through the same policy (the collate leaves the row out and reports it; the
loader raises or logs). Nothing is dropped silently.

In a distributed run every rank skips the same items and only rank 0 writes ``skipped.jsonl``.
Rows written while training carry the optimizer ``step`` they were skipped in, so a resumed
run drops those after its checkpoint (``BadData.truncate``). ``mmfw eval`` goes through the
same path (``BadData(..., evaluating=True)``): its rows are ``when = "eval"``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..config.recipe import PLUGIN_SECTIONS, Recipe
from ..registry import create
from ..run.jsonl import append_jsonl, read_jsonl, rewrite_jsonl
from ..run.rundir import SKIPPED_JSONL
from ..spi.capabilities import Uint8Vision
from ..spi.contracts import Item, Problem
from ..spi.errors import DataError, RecipeError
from .augment import TrainAugment, as_uint8, encoder_input_size
from .batching import Batch, Collate, Pairs
from .imagecache import ImageCache, cache_key

SKIPPED = SKIPPED_JSONL  # the name this module used to export
#: problems listed in the error that stops a run (the rest are counted)
SHOWN = 10


class BadData:
    """``data.on_bad`` applied to problems found by the scan, in training and in evaluation.

    ``main``: whether this process writes ``skipped.jsonl`` (rank 0 of a distributed run; the
    other ranks skip the same items and write nothing). ``run_dir`` None: nothing is written
    (evaluating a run directory that is not writable). ``evaluating``: made for ``mmfw eval``,
    where every row is ``when = "eval"`` and the rows training wrote are left alone.
    ``step``: set by the trainer to read its optimizer step; each row written while training
    then carries the step it was skipped in, so that a resume can drop the rows after its
    checkpoint (:meth:`truncate`).
    """

    def __init__(self, policy: str, run_dir: Path | None, say: Callable[[str], None], *,
                 main: bool = True, evaluating: bool = False) -> None:
        self.policy, self.say, self.main, self.evaluating = policy, say, main, evaluating
        self.log: Path | None = Path(run_dir) / SKIPPED_JSONL if run_dir is not None else None
        self.step: Callable[[], int] | None = None
        self._started = evaluating  # evaluation never rewrites what training logged

    @property
    def _writes(self) -> bool:
        return self.main and self.log is not None

    def _logged(self, each: bool = False) -> str:
        if self.log is None:
            return "not logged: the run directory is not writable"
        return f"each is listed in {self.log}" if each else f"logged to {self.log}"

    def _keep_old(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A resumed run scans again: the earlier scan's rows give way to the new ones."""
        return [r for r in rows if self._started or r.get("when") != "scan"]

    def _write(self, rows: Sequence[dict[str, Any]]) -> None:
        if not self._writes or self.log is None:
            return
        if not self._started:  # a resumed run: keep what earlier training skipped
            if self.log.is_file():
                rewrite_jsonl(self.log, self._keep_old(read_jsonl(self.log, self.say)))
            self._started = True
        append_jsonl(self.log, rows)

    def truncate(self, step: int) -> None:
        """On resume from checkpoint ``step``: drop the rows written while training after it
        (that part of training runs again and logs them again), keep scan and eval rows."""
        if self._writes and self.log is not None and self.log.is_file():
            rows = self._keep_old(read_jsonl(self.log, self.say))
            rewrite_jsonl(self.log, [r for r in rows
                                     if r.get("when") != "train" or r.get("step", 0) <= step])
        self._started = True

    def scan(self, split: str, problems: Sequence[Problem]) -> list[int]:
        """Indices of the items to leave out; raises in ``"error"`` mode."""
        if not problems:
            return []
        before = "evaluating" if self.evaluating else "training"
        if self.policy == "error":
            shown = "\n".join(f"  {p.where}: {p.reason}" for p in problems[:SHOWN])
            more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
            how = ("data.on_bad = \"skip\" (`mmfw eval ... --data on_bad=skip`)"
                   if self.evaluating else "data.on_bad = \"skip\"")
            logged = f" (each is then logged to {self.log})" if self.log is not None else ""
            raise DataError(
                f"bad data in the '{split}' split: {len(problems)} problem(s), found before "
                f"{before}:\n{shown}{more}\nFix or remove them, or set {how} to leave them "
                f"out{logged}")
        when = "eval" if self.evaluating else "scan"
        self._write([{"when": when, "split": split, "where": p.where, "reason": p.reason,
                      "item": p.index} for p in problems])
        bad = sorted({p.index for p in problems if p.index is not None})
        named = "".join(f"\n  {p.where}: {p.reason}" for p in problems[:SHOWN]) \
            if self.evaluating else ""
        self.say(f"data: skipped {len(problems)} bad item(s) of the '{split}' split "
                 f"(data.on_bad = \"skip\"; {self._logged(each=True)}){named}")
        return bad

    def training(self, split: str, problems: Sequence[Problem]) -> None:
        if self.policy == "error":
            p = problems[0]
            raise DataError(f"bad data while training on the '{split}' split: {p.where}: "
                            f"{p.reason}\nSet data.on_bad = \"skip\" to leave such items out "
                            f"(each is then logged to {self.log})")
        extra = {"step": self.step() + 1} if self.step is not None else {}
        self._write([{"when": "train", "split": split, "where": p.where, "reason": p.reason,
                      "item": p.index, **extra} for p in problems])
        for p in problems:
            self.say(f"data: skipped {p.where} while training ({p.reason}; "
                     f"{self._logged()})")

    def evaluation(self, split: str, problem: Problem) -> None:
        if self.policy == "error":
            how = " (`mmfw eval ... --data on_bad=skip`)" if self.evaluating else ""
            raise DataError(f"bad data while evaluating the '{split}' split: {problem.where}: "
                            f"{problem.reason}\nSet data.on_bad = \"skip\"{how} to go on "
                            "without it")
        self._write([{"when": "eval", "split": split, "where": problem.where,
                      "reason": problem.reason, "item": problem.index}])
        self.say(f"data: {problem.where} failed to load while evaluating '{split}' "
                 f"({problem.reason}); a blank image stands in for it "
                 f"({self._logged()})")


class Prepared:
    """A split with the skipped items left out (``keep``) and its images cached (``cache``).

    In an evaluation view (``on_error`` set) an image that fails to load is handed to the
    bad-data policy; in the training view the error propagates to ``Pairs``, which reports it.
    """

    def __init__(self, split: Any, keep: Sequence[int] | None = None) -> None:
        self.split, self.keep = split, list(keep) if keep is not None else None
        self.cache: ImageCache | None = None
        self.on_error: Callable[[Problem], None] | None = None

    def _j(self, i: int) -> int:
        if i < 0 or i >= len(self):
            raise IndexError(i)
        return self.keep[i] if self.keep is not None else i

    def __len__(self) -> int:
        return len(self.keep) if self.keep is not None else len(self.split)

    def captions(self, i: int) -> Sequence[str]:
        return self.split.captions(self._j(i))

    def group(self, i: int) -> str | None:
        fn = getattr(self.split, "group", None)
        return fn(self._j(i)) if callable(fn) else None

    def __getitem__(self, i: int) -> Item:
        j = self._j(i)
        if self.cache is not None and (hit := self.cache.get(i)) is not None:
            return Item(hit[0], self.split.captions(j), hit[1])
        try:
            item = self.split[j]
        except DataError as err:
            if self.on_error is None:
                raise
            where, _, why = str(err).partition(": ")
            self.on_error(Problem(where, why or where, i))
            size = self.cache.size if self.cache is not None else (32, 32)
            return Item(torch.zeros(3, *size, dtype=torch.uint8), self.split.captions(j), -1)
        if self.cache is None:
            return item
        image = as_uint8(item.image)
        if tuple(image.shape[-2:]) != self.cache.size:
            from torchvision.transforms.v2 import functional as TF

            image = TF.resize(image, list(self.cache.size), antialias=True)
        image = image.contiguous()
        self.cache.put(i, image, int(item.image_id))
        return Item(image, item.captions, item.image_id)

    def view(self, on_error: Callable[[Problem], None]) -> Prepared:
        """The same split for evaluation: load failures go to ``on_error``."""
        other = Prepared(self.split, self.keep)
        other.cache, other.on_error = self.cache, on_error
        return other


class CheckedSource:
    """What the engine holds as ``source``: ``split(name)`` gives checked, cached splits."""

    def __init__(self, source: Any, recipe: Recipe, policy: BadData) -> None:
        self.source, self.recipe, self.policy = source, recipe, policy
        self.splits = tuple(source.splits)
        self._prepared: dict[str, Prepared] = {}
        self._views: dict[str, Prepared] = {}
        self.cache_size: tuple[int, int] | None = None

    def prepared(self, name: str) -> Prepared:
        """The training view of a split: scanned (once) and with bad items left out."""
        if name not in self._prepared:
            if name not in self.splits:
                raise RecipeError(f"dataset '{self.recipe.data.dataset.name}' has no split "
                                  f"'{name}'", expected="one of " + ", ".join(self.splits),
                                  given=name)
            split = self.source.split(name)
            scan = getattr(split, "problems", None)
            problems = scan(self.recipe.data.check == "full") if callable(scan) else []
            bad = set(self.policy.scan(name, problems))
            keep = [i for i in range(len(split)) if i not in bad] if bad else None
            self._prepared[name] = p = Prepared(split, keep)
            if self.cache_size is not None:
                self._attach(name, p)
        return self._prepared[name]

    def split(self, name: str) -> Prepared:
        if name not in self._views:
            self._views[name] = self.prepared(name).view(
                lambda problem: self.policy.evaluation(name, problem))
        return self._views[name]

    def use_cache(self, size: tuple[int, int]) -> None:
        self.cache_size = size
        for name, p in self._prepared.items():
            self._attach(name, p)

    def _attach(self, name: str, p: Prepared) -> None:
        d = self.recipe.data
        key = cache_key(d.dataset.name, d.dataset.values(), name, len(p), p.keep,
                        self.cache_size)
        p.cache = ImageCache(d.cache, f"{d.dataset.name}-{name}-{key}", len(p),
                             self.cache_size)  # type: ignore[arg-type]
        if name in self._views:
            self._views[name].cache = p.cache


class TrainLoader:
    """The DataLoader, with rows that failed to load while training sent to ``data.on_bad``."""

    def __init__(self, loader: DataLoader, policy: BadData, split: str) -> None:
        self.loader, self.policy, self.split = loader, policy, split

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            if batch.problems:
                self.policy.training(self.split, batch.problems)
                if len(batch) == 0:
                    raise DataError(f"every item of a training batch failed to load (first: "
                                    f"{batch.problems[0].where}): is the data still there?")
            yield batch


class TrainingData:
    """The train split (map-style ``Pairs`` or a stream), its sampler and its loader.

    ``rank`` / ``world_size``: this process's place among distributed ranks; samplers and
    streams give each rank its own share of every epoch.
    """

    def __init__(self, recipe: Recipe, run_dir: Path, say: Callable[[str], None], *,
                 rank: int = 0, world_size: int = 1) -> None:
        t0 = time.perf_counter()
        r, d = recipe, recipe.data
        self.recipe, self.say, self.rank, self.world_size = r, say, rank, world_size
        self.policy = BadData(d.on_bad, run_dir, say, main=rank == 0)
        self.source = CheckedSource(create("dataset", d.dataset.name, options=d.dataset.options),
                                    r, self.policy)
        if d.train_split not in self.source.splits:
            raise RecipeError(f"dataset '{d.dataset.name}' has no split '{d.train_split}'",
                              key="data.train_split",
                              expected="one of " + ", ".join(self.source.splits),
                              given=d.train_split)
        stream_of = getattr(self.source.source, "stream", None)
        self.stream = stream_of(d.train_split, batch_size=r.sampler.batch_size, seed=r.run.seed,
                                drop_last=r.sampler.drop_last, rank=rank,
                                world_size=world_size, num_workers=d.num_workers
                                ) if callable(stream_of) else None
        if self.stream is not None:
            self._scan_stream()
            self.split: Any = self.stream
            self.pairs: Any = self.stream
            what = f"streamed, {self.stream.pairs} pairs an epoch"
        else:
            self.split = self.source.prepared(d.train_split)
            self.pairs = Pairs(self.split)
            what = f"{len(self.split)} images, {len(self.pairs)} pairs"
        for name in self._eval_splits():
            self.source.prepared(name)  # scanned now: bad data stops the run before training
        self.say(f"data: {d.dataset.name} '{d.train_split}' split, {what} "
                 f"({time.perf_counter() - t0:.1f}s)")

    def _eval_splits(self) -> list[str]:
        r = self.recipe
        names = [r.eval.val_split, r.eval.split]
        return [n for n in dict.fromkeys(names) if n and n in self.source.splits]

    def _scan_stream(self) -> None:
        s, name = self.stream, self.recipe.data.train_split
        if not getattr(s, "scanned", True):
            self.say(f"data: the '{name}' shards are remote and not scanned before training; "
                     "bad samples are handled as they stream (data.on_bad)")
        scan = getattr(s, "problems", None)
        problems = scan(self.recipe.data.check == "full") if callable(scan) else []
        bad = self.policy.scan(name, problems)
        if bad:
            s.without(bad)

    def sampler(self) -> Any:
        """The batch sampler the recipe names (a stream is its own sampler)."""
        r = self.recipe
        if self.stream is not None:
            default = PLUGIN_SECTIONS["sampler"][2]  # the recipe's default sampler
            if r.sampler.plugin.name != default:
                raise RecipeError(
                    f"sampler '{r.sampler.plugin.name}' needs a map-style training split; "
                    f"'{r.data.dataset.name}' streams it (its order comes from shard and buffer "
                    "shuffling)", key="sampler.name",
                    expected=f'"{default}", or data.mode = "indexed" for local shards',
                    given=r.sampler.plugin.name)
            return self.stream
        return create("sampler", r.sampler.plugin.name, options=r.sampler.plugin.options,
                      match_ids=self.pairs.items, batch_size=r.sampler.batch_size,
                      seed=r.run.seed, drop_last=r.sampler.drop_last, texts=self.pairs.texts(),
                      groups=self.pairs.groups(), rank=self.rank, world_size=self.world_size)

    def loader(self, model: Any, sampler: Any, *, pin_memory: bool = False) -> TrainLoader:
        """The training loader: cache attached, augmentation in the collate, bad rows checked."""
        d = self.recipe.data
        size = None
        if d.cache or d.augment.images_on:
            size = encoder_input_size(model.vision.preprocess)
            if size is None:
                raise RecipeError("the vision encoder does not resize images to one size, so "
                                  "there is no size to cache or crop them at",
                                  key="data.cache" if d.cache else "data.augment.crop_scale")
        if d.cache:
            self.source.use_cache(size)  # type: ignore[arg-type]
            if self.stream is not None:
                self.say("data: the image cache serves the evaluation splits; the streamed "
                         "train split is decoded as it comes")
        augment = None
        a = d.augment
        if a.images_on or a.text_on:
            augment = TrainAugment(a, size or (0, 0))
            augment.prepare(self.pairs.texts())
        collate = Collate(pixel_preprocess(model.vision, d.uint8), model.text.tokenize,
                          None if self.stream is not None else sampler.match_ids, augment)
        workers = d.num_workers
        # the loader's own generator: each new iterator draws its workers' base seed, and
        # from the global RNG that draw would shift every later dropout mask of a run resumed
        # mid-epoch (one iterator more than the unbroken run made)
        generator = torch.Generator().manual_seed(self.recipe.run.seed)
        if self.stream is not None:
            loader = DataLoader(self.stream, batch_size=None, collate_fn=collate,
                                num_workers=workers, persistent_workers=workers > 0,
                                pin_memory=pin_memory, generator=generator)
        else:
            loader = DataLoader(self.pairs, batch_sampler=sampler, collate_fn=collate,
                                num_workers=workers, persistent_workers=workers > 0,
                                pin_memory=pin_memory, generator=generator)
        return TrainLoader(loader, self.policy, d.train_split)


def pixel_preprocess(vision: Any, uint8: bool) -> Any:
    """The vision encoder's ``preprocess_uint8`` (uint8 out; ``normalize`` on the device then
    finishes it) where it has one and ``data.uint8`` asks for it, else ``preprocess``."""
    if not (uint8 and isinstance(vision, Uint8Vision)):
        return vision.preprocess
    try:  # a plugin may have the method but not for every configuration of its model
        vision.preprocess_uint8(torch.zeros(3, 8, 8, dtype=torch.uint8))
    except NotImplementedError:
        return vision.preprocess
    return vision.preprocess_uint8
