"""``webdataset``: tar shards of ``<key>.jpg|png`` + ``<key>.txt|json`` samples.

Training streams through the ``webdataset`` package (``mode = "stream"``): shards are
shuffled per epoch from the seed, dealt out to distributed ranks and then to DataLoader
workers, read sequentially, their pairs shuffled in a buffer and batched in the workers. URLs
(``https://``, ``pipe:``) work as well as local files. An epoch is a fixed number of batches
(``len``), counted from local shards or declared with ``pairs_per_epoch``; each worker yields
its share and starts its shards again if they run dry, so ranks and workers stay in step.

A ``pipe:`` URL runs a shell command: it is code, refused when the options are validated (before
any shard is opened) unless code is allowed (``mmfw --allow-code``, see ``mmfw.spi.trust``).

Local, uncompressed shards can instead be indexed (``mode = "indexed"``): member offsets are
read once and the split is map-style, so every sampler, the image cache and exact mid-epoch
resume apply. Evaluation splits are always map-style (indexed, or held in memory when remote).
See docs/data.md for why both exist.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import json
import math
import multiprocessing as mp
import random
import tarfile
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple
from urllib.parse import urlparse

import attrs
from torch.utils.data import IterableDataset, get_worker_info

from mmfw.spi import DataError, Item, Problem, Row, option, require_code

from . import images
from .filesplit import stable_id

SPLITS = ("train", "val", "test")
_REMOTE = ("http://", "https://", "pipe:", "s3://", "gs://", "ais://", "hf://")


def _wds() -> Any:
    try:
        import webdataset
    except ImportError:  # pragma: no cover - a declared dependency
        raise DataError("the webdataset dataset needs the 'webdataset' package: "
                        "pip install webdataset") from None
    return webdataset


def runs_shell(url: str) -> bool:
    """Whether webdataset's ``gopen`` would open ``url`` through a shell (``pipe:``), after the
    rewrites it applies itself (``GOPEN_REWRITE``). Other schemes run fixed commands (curl,
    gsutil, ais) with the URL as an argument, never as shell text."""
    _wds()
    gopen = importlib.import_module("webdataset.gopen")  # the package's `gopen` is the function
    seen = [url]
    with contextlib.suppress(ValueError):  # webdataset's security mode: no rewrite applies
        seen.append(gopen.rewrite_url(url))
    for u in seen:
        try:
            scheme = urlparse(u).scheme  # as gopen parses it (lower case, controls dropped)
        except ValueError:  # gopen cannot parse it either: it opens nothing
            scheme = ""
        if u.startswith("pipe:") or gopen.gopen_schemes.get(scheme) is gopen.gopen_pipe:
            return True
    return False


def check_code(spec: str, key: str) -> None:
    """Refuse the shell commands among the shards of ``spec`` unless code is allowed."""
    if not spec:
        return
    pipes = [u for u in _wds().shardlists.expand_urls(spec) if u and runs_shell(u)]
    if pipes:
        more = f" (and {len(pipes) - 1} more pipe: URLs)" if len(pipes) > 1 else ""
        require_code(f"shard URL {pipes[0]!r}{more}", key=key, given=pipes[0])


def _no_shell(_: object, attribute: attrs.Attribute, value: str) -> None:
    check_code(value, attribute.name)  # the recipe loader puts it under [data]


@attrs.frozen
class WebDatasetOptions:
    train: str = option("", doc="train shards: paths or URLs, brace notation "
                        "('data/train-{000000..000099}.tar'); '::' joins lists; a pipe: URL "
                        "is a shell command, refused without mmfw --allow-code",
                        validator=_no_shell)
    val: str = option("", doc="val shards ('': no val split)", validator=_no_shell)
    test: str = option("", doc="test shards ('': no test split)", validator=_no_shell)
    root: str = option("", doc="a CLIP_benchmark webdataset folder (clip_benchmark_export_wds: "
                       "<split>/nshards.txt and <split>/0.tar ..., samples .webp|.jpg + .txt "
                       "with one caption a line): its splits, where train / val / test name "
                       "no shards")
    mode: Literal["stream", "indexed"] = option(
        "stream", doc="train by streaming the shards (any URL), or by indexing local "
        "uncompressed shards into a map-style split (every sampler, the cache, exact resume)")
    image_keys: tuple[str, ...] = option(("jpg", "jpeg", "png", "webp"),
                                         doc="extensions of a sample's image, first found wins")
    json_field: str = option("caption", doc="field of a sample's .json holding its caption or "
                             "list of captions (a .txt holds one caption per line)")
    shuffle_buffer: int = option(2000, doc="pairs held in the streaming shuffle buffer",
                                 validator=attrs.validators.ge(1))
    pairs_per_epoch: int = option(0, doc="pairs in an epoch of the train stream (0: count "
                                  "them in the local shards before training)",
                                  validator=attrs.validators.ge(0))


class Sample(NamedTuple):
    key: str  # "<shard file name>/<sample key>": unique in the dataset
    shard: str
    image: tuple[int, int] | None  # (offset, size) in an uncompressed local shard
    data: bytes | None  # image bytes when held in memory
    captions: tuple[str, ...]
    problem: str | None  # why it has no usable image or caption

    @property
    def image_id(self) -> int:
        return stable_id(self.key)

    @property
    def where(self) -> str:
        return f"{self.shard}: {self.key.partition('/')[2]}"


def _is_remote(url: str) -> bool:
    return url.startswith(_REMOTE)


def expand(spec: str, what: str) -> list[str]:
    check_code(spec, what)  # validated with the options already; again before opening
    urls = _wds().shardlists.expand_urls(spec)
    urls = [u for u in urls if u]
    if not urls:
        raise DataError(f"no shards in {what} = {spec!r}")
    for u in urls:
        if not _is_remote(u) and not Path(u.removeprefix("file:")).expanduser().is_file():
            raise DataError(f"shard not found: {u} ({what})")
    return urls


def _captions(sample: dict[str, Any], json_field: str) -> tuple[list[str], str | None]:
    """Captions of a raw sample (``ext -> bytes``), or why there are none."""
    if "txt" in sample:
        try:
            text = sample["txt"].decode("utf-8")
        except UnicodeDecodeError:
            return [], ".txt is not UTF-8 text"
        caps = [line.strip() for line in text.splitlines() if line.strip()]
        return caps, None if caps else "empty caption"
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return [], f".json is not valid JSON ({err})"
        value = meta.get(json_field) if isinstance(meta, dict) else None
        if value is None:
            return [], f".json has no field {json_field!r} (data.json_field)"
        values = value if isinstance(value, list) else [value]
        caps = [str(v).strip() for v in values if v is not None and str(v).strip()]
        return caps, None if caps else "empty caption"
    return [], "sample has no caption (.txt or .json)"


def _image_ext(sample: Collection[str], image_keys: Sequence[str]) -> str | None:
    return next((k for k in image_keys if k in sample), None)


def _judge(captions: list[str], why: str | None, ext: str | None) -> str | None:
    if ext is None:
        return "sample has no image (" + ", ".join(f".{k}" for k in ("jpg", "png")) + ", ...)"
    return why


def _local(url: str) -> Path:
    return Path(url.removeprefix("file:")).expanduser()


def _compressed(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(6)
    return head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00"


def index_shard(url: str, o: WebDatasetOptions) -> list[Sample]:
    """Every sample of a local shard: image offset (uncompressed shards) and captions."""
    path = _local(url)
    keep_offsets = not _compressed(path)
    name = path.name
    samples: list[Sample] = []
    current: dict[str, Any] = {}
    key = None

    def close() -> None:
        if key is None:
            return
        caps, why = _captions(current, o.json_field)
        ext = _image_ext(current, o.image_keys)
        where = current.get(ext) if ext else None
        samples.append(Sample(f"{name}/{key}", url, where if keep_offsets else None, None,
                              tuple(caps), _judge(caps, why, ext)))

    base_plus_ext = _wds().tariterators.base_plus_ext
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                if not m.isreg():
                    continue
                prefix, ext = base_plus_ext(m.name)
                if prefix is None:
                    continue
                ext = ext.lower()
                if prefix != key:
                    close()
                    key, current = prefix, {}
                if ext in ("txt", "json"):
                    f = tf.extractfile(m)
                    current[ext] = f.read() if f else b""
                elif ext in o.image_keys:
                    current[ext] = (m.offset_data, m.size)
            close()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"{url}: not a readable tar shard ({err})") from None
    return samples


def read_shards(urls: Sequence[str], o: WebDatasetOptions,
                on_error: Callable[[str, str], None] | None = None) -> Iterator[Sample]:
    """Samples with their image bytes, read sequentially through webdataset (any URL)."""
    errors: list[tuple[str, str]] = []

    def handler(exn: Exception) -> bool:
        where = next((a for a in reversed(exn.args) if isinstance(a, str) and a in urls), "?")
        errors.append((where, f"unreadable shard data ({exn.args[0] if exn.args else exn})"))
        return True  # go on with the next shard

    src = _wds().tarfile_samples([{"url": u} for u in urls], handler=handler)
    for raw in src:
        while errors and on_error is not None:
            on_error(*errors.pop(0))
        url = raw.get("__url__", "?")
        caps, why = _captions(raw, o.json_field)
        ext = _image_ext(raw, o.image_keys)
        name = url.rsplit("/", 1)[-1]
        yield Sample(f"{name}/{raw['__key__']}", url, None, raw.get(ext) if ext else None,
                     tuple(caps), _judge(caps, why, ext))
    if errors and on_error is None:
        where, why = errors[0]
        raise DataError(f"{where}: {why}")
    while errors and on_error is not None:
        on_error(*errors.pop(0))


def _read_image(sample: Sample) -> bytes:
    if sample.data is not None:
        return sample.data
    assert sample.image is not None
    offset, size = sample.image
    with open(_local(sample.shard), "rb") as f:
        f.seek(offset)
        return f.read(size)


class ShardSplit:
    """A map-style split of shard samples (local shards indexed, remote ones held in memory).

    Samples without an image or a caption are not items; ``problems()`` reports them."""

    def __init__(self, urls: Sequence[str], o: WebDatasetOptions) -> None:
        self.urls, self.options = list(urls), o
        everything: list[Sample] = []
        shard_errors: list[Problem] = []
        for url in urls:
            if _is_remote(url):
                everything.extend(read_shards([url], o, lambda w, r: shard_errors.append(
                    Problem(w, r))))
            else:
                everything.extend(index_shard(url, o))
        self._bad = [Problem(s.where, s.problem) for s in everything
                     if s.problem is not None] + shard_errors
        self.samples = [s for s in everything if s.problem is None]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Item:
        s = self.samples[index]
        where = s.where
        if s.data is None and s.image is None:
            raise DataError(f"{where}: indexed mode needs uncompressed .tar shards (this one is "
                            "compressed); use data.mode = \"stream\"")
        return Item(images.decode(_read_image(s), where), s.captions, s.image_id)

    def captions(self, index: int) -> Sequence[str]:
        return self.samples[index].captions

    def problems(self, full: bool = False) -> list[Problem]:
        found = list(self._bad)
        by_key = {s.key: i for i, s in enumerate(self.samples)}
        local = [u for u in self.urls if not _is_remote(u)]
        in_memory = [i for i, s in enumerate(self.samples) if s.data is not None]
        for i in in_memory:
            s = self.samples[i]
            why = images.check(s.data or b"", s.key, full=full)
            if why:
                found.append(Problem(s.where, why, i))
        for s in read_shards(local, self.options):  # sequential: compressed shards too
            if s.key in by_key and s.data is not None:
                why = images.check(s.data, s.key, full=full)
                if why:
                    found.append(Problem(s.where, why, by_key[s.key]))
        return found


class ShardStream(IterableDataset):
    """The train split as a stream of row batches; also the sampler the engine steps.

    ``len`` is the batches of one epoch on this rank. The engine's ``set_epoch`` and the resume
    state reach the DataLoader workers through shared values, so persistent workers see them.
    Batch ``j`` of an epoch comes from worker ``j mod workers`` (the DataLoader's round
    robin); resuming at ``position`` makes each worker skip its share of the batches already
    trained, reading but not decoding them, and rotates the workers' parts so the remaining
    batches come in their original order.

    Local shards are indexed first (``index``): that counts the pairs and lets ``problems``
    scan them before training. Remote shards are not scanned (``scanned`` is False): their bad
    samples reach the engine as problem rows while training, under the same ``data.on_bad``.
    """

    match_ids: Sequence[int] = ()

    def __init__(self, urls: Sequence[str], o: WebDatasetOptions, *, index: ShardSplit | None,
                 batch_size: int, seed: int, drop_last: bool, rank: int, world_size: int,
                 num_workers: int) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        readers = world_size * max(num_workers, 1)
        if len(urls) < readers:
            raise DataError(f"{len(urls)} train shards cannot feed {world_size} rank(s) x "
                            f"{max(num_workers, 1)} DataLoader worker(s): each reader needs a "
                            "shard of its own; lower data.num_workers or write more shards")
        if index is None and not o.pairs_per_epoch:
            raise DataError("the train shards include URLs: declare the epoch length with "
                            "data.pairs_per_epoch (local shards are counted)")
        self.urls, self.options, self.index = list(urls), o, index
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.scanned = index is not None
        self.exclude: frozenset[str] = frozenset()
        self._epoch = mp.Value("q", 0)
        self._position = mp.Value("q", 0)

    # what the engine asks before training (main process) ----------------------------------
    def problems(self, full: bool = False) -> list[Problem]:
        """The scan of the indexed local shards; indices refer to ``index.samples``."""
        return self.index.problems(full) if self.index is not None else []

    def without(self, indices: Collection[int]) -> ShardStream:
        """Leave out the samples at these ``index`` positions (``data.on_bad = "skip"``)."""
        if self.index is not None:
            self.exclude = frozenset(self.index.samples[i].key for i in indices)
        return self

    def _kept(self) -> list[Sample]:
        assert self.index is not None
        return [s for s in self.index.samples if s.key not in self.exclude]

    @property
    def pairs(self) -> int:
        if self.options.pairs_per_epoch:
            return self.options.pairs_per_epoch
        return sum(len(s.captions) for s in self._kept())

    def texts(self) -> list[str]:
        """Every training caption (tokenizers that learn their vocabulary need them)."""
        if self.index is not None:
            return [c for s in self._kept() for c in s.captions]
        return [c for s in read_shards(self.urls, self.options) for c in s.captions]

    # the sampler side (main process) -----------------------------------------------------
    def __len__(self) -> int:
        per_rank = self.pairs // self.world_size
        b = self.batch_size
        return per_rank // b if self.drop_last else math.ceil(per_rank / b)

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    @property
    def position(self) -> int:
        return int(self._position.value)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._epoch.value, self._position.value = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._epoch.value, self._position.value = int(state["epoch"]), int(state["position"])

    # the stream (DataLoader workers) -----------------------------------------------------
    def shards_for(self, epoch: int, worker: int, workers: int) -> list[str]:
        """This reader's shards in ``epoch``: one seeded shuffle, dealt to ranks x workers."""
        order = list(self.urls)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order[self.rank * workers + worker::self.world_size * workers]

    @staticmethod
    def quota(batches: int, worker: int, workers: int) -> int:
        """Batches worker ``worker`` yields in an epoch: an equal share, the first ones one more
        (the DataLoader takes batches from workers in turn)."""
        return batches // workers + (1 if worker < batches % workers else 0)

    def __iter__(self) -> Iterator[list[Row]]:
        info = get_worker_info()
        workers = info.num_workers if info is not None else 1
        epoch, position = self.epoch, self.position
        # the DataLoader asks worker 0 first: after a resume at `position` it must play the
        # part of the worker that owned batch `position`, the others following in turn
        worker = ((info.id if info is not None else 0) + position) % workers
        quota = self.quota(len(self), worker, workers)
        skip = max(0, (position - worker + workers - 1) // workers)
        made = 0
        for batch in self._batches(epoch, worker, workers):
            if made >= quota:
                break
            made += 1
            if made <= skip:
                continue  # trained before the checkpoint: read, not decoded
            yield self._decode(batch)
        if info is None:  # single process: the epoch is over (workers cannot tell the parent)
            self._epoch.value, self._position.value = epoch + 1, 0

    def _batches(self, epoch: int, worker: int, workers: int) -> Iterator[list[Row]]:
        shards = self.shards_for(epoch, worker, workers)
        rng = random.Random(hash((self.seed, epoch, self.rank, worker)) & 0xFFFFFFFF)
        buffer: list[Row] = []
        batch: list[Row] = []
        size = self.options.shuffle_buffer
        for round_ in itertools.count():
            order = list(shards)
            random.Random(hash((self.seed, epoch, self.rank, worker, round_))).shuffle(order)
            produced = False
            for row in self._rows(order):
                produced = True
                if len(buffer) < size:
                    buffer.append(row)
                    continue
                j = rng.randrange(len(buffer))
                buffer[j], row = row, buffer[j]
                batch.append(row)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            if not produced:
                raise DataError(f"train shards {shards} hold no usable sample")
            rng.shuffle(buffer)  # drain between rounds: the buffer refills from the next
            while buffer:
                batch.append(buffer.pop())
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []

    def _rows(self, shards: Sequence[str]) -> Iterator[Row]:
        problems: list[Row] = []

        def shard_error(where: str, why: str) -> None:
            problems.append(Row(None, "", -1, -1, Problem(where, why)))

        for s in read_shards(shards, self.options, shard_error):
            yield from problems
            problems.clear()
            if s.key in self.exclude:
                continue
            if s.problem is not None:
                if not self.scanned:  # a scan before training reported it already
                    yield Row(None, "", -1, -1, Problem(s.where, s.problem))
                continue
            for caption in s.captions:
                yield Row(s.data, caption, -1, s.image_id, None, s.where)
        yield from problems

    @staticmethod
    def _decode(batch: list[Row]) -> list[Row]:
        done: dict[int, Any] = {}
        out = []
        for row in batch:
            if row.problem is None and row.item not in done:
                try:
                    done[row.item] = images.decode(row.image, row.where)
                except DataError as err:
                    done[row.item] = Problem(row.where, str(err).removeprefix(f"{row.where}: "))
            got = done.get(row.item)
            if isinstance(got, Problem):
                out.append(row._replace(image=None, problem=got))
            elif row.problem is None:
                out.append(row._replace(image=got))
            else:
                out.append(row)
        return out


class WebDataset:
    """Factory product of ``webdataset``."""

    Options = WebDatasetOptions

    def __init__(self, options: WebDatasetOptions) -> None:
        self.options = options
        self.splits = tuple(s for s in SPLITS if getattr(options, s) or self._counted(s))
        if not self.splits:
            raise ValueError("give the shards of at least one split: train, val or test" +
                             (f" (root {options.root} has no <split>/nshards.txt)"
                              if options.root else ""))
        self._made: dict[str, ShardSplit] = {}

    def _counted(self, name: str) -> Path | None:
        """``root/<name>/nshards.txt`` (CLIP_benchmark's layout), if there is one."""
        if not self.options.root:
            return None
        path = Path(self.options.root).expanduser() / name / "nshards.txt"
        return path if path.is_file() else None

    def _urls(self, name: str) -> list[str]:
        if name not in self.splits:
            raise KeyError(f"webdataset has splits {self.splits}, not '{name}'")
        count = None if getattr(self.options, name) else self._counted(name)
        if count is None:
            return expand(getattr(self.options, name), f"data.{name}")
        try:
            n = int(count.read_text().strip())
        except (OSError, ValueError) as err:
            raise DataError(f"{count}: not a shard count ({err})") from None
        return expand("::".join(str(count.parent / f"{i}.tar") for i in range(n)),
                      f"data.root ({name})")

    def split(self, name: str) -> ShardSplit:
        if name not in self._made:
            self._made[name] = ShardSplit(self._urls(name), self.options)
        return self._made[name]

    def stream(self, name: str, *, batch_size: int, seed: int, drop_last: bool, rank: int = 0,
               world_size: int = 1, num_workers: int = 0) -> ShardStream | None:
        """The split as a stream (None in indexed mode: the engine trains from ``split``)."""
        if self.options.mode == "indexed":
            return None
        urls = self._urls(name)
        index = None if any(_is_remote(u) for u in urls) else self.split(name)
        return ShardStream(urls, self.options, index=index, batch_size=batch_size, seed=seed,
                           drop_last=drop_last, rank=rank, world_size=world_size,
                           num_workers=num_workers)
