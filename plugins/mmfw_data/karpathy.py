"""``karpathy``: Flickr30k / Flickr8k / COCO in Karpathy's split files (``dataset_*.json``).

The layout: ``{"images": [{"filename", "filepath"?, "imgid", "split", "sentences":
[{"raw", ...}, ...]}, ...]}``. ``filepath`` (COCO's ``train2014``/``val2014``) sits between the
image root and the file name. Every caption of an image is kept (seed 000: "use all 5
captions"); COCO's ``restval`` images join ``train`` unless ``restval_in_train`` is off.
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs

from mmfw.spi import DataError, Problem, option

from .filesplit import FileSplit, Record, require_file, resolve

SPLITS = ("train", "val", "test")


@attrs.frozen
class KarpathyOptions:
    annotations: str = option(doc="the Karpathy split file, e.g. dataset_flickr30k.json")
    images: str = option("", doc="folder the image file names are relative to ('': the "
                         "annotation file's folder)")
    restval_in_train: bool = option(True, doc="train on COCO's 'restval' images too (the usual "
                                    "113k-image Karpathy train split)")


class KarpathyDataset:
    """Factory product of ``karpathy``: the annotation file is read on first use."""

    splits = SPLITS
    Options = KarpathyOptions

    def __init__(self, options: KarpathyOptions) -> None:
        self.options = options
        self._splits: dict[str, FileSplit] | None = None

    def split(self, name: str) -> FileSplit:
        if name not in SPLITS:
            raise KeyError(f"karpathy has splits {SPLITS}, not '{name}'")
        if self._splits is None:
            self._splits = self._read()
        return self._splits[name]

    def _read(self) -> dict[str, FileSplit]:
        ann = require_file(Path(self.options.annotations).expanduser(),
                           "Karpathy annotation file (data.annotations)")
        root = Path(self.options.images).expanduser() if self.options.images else ann.parent
        if not root.is_dir():
            raise DataError(f"image folder not found: {root} (data.images)")
        try:
            data = json.loads(ann.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{ann}: not valid JSON ({err})") from None
        entries = data.get("images") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise DataError(f"{ann}: expected an object with an \"images\" list (the Karpathy "
                            "split layout of dataset_flickr30k.json / dataset_coco.json)")
        records: dict[str, list[Record]] = {s: [] for s in SPLITS}
        problems: dict[str, list[Problem]] = {s: [] for s in SPLITS}
        for k, entry in enumerate(entries):
            where = f"{ann}: images[{k}]"
            if not isinstance(entry, dict):
                problems["train"].append(Problem(where, "not an object"))
                continue
            split = entry.get("split", "")
            if split == "restval":
                if not self.options.restval_in_train:
                    continue
                split = "train"
            if split not in SPLITS:
                problems["train"].append(Problem(where, f"unknown split {split!r} (expected "
                                                 "train, val, test or restval)"))
                continue
            filename = str(entry.get("filename") or "").strip()
            if not filename:
                problems[split].append(Problem(where, "row has no image (no \"filename\")"))
                continue
            where = f"{where} ({filename})"
            captions = []
            for j, sentence in enumerate(entry.get("sentences") or []):
                raw = sentence.get("raw", "") if isinstance(sentence, dict) else ""
                if isinstance(raw, str) and raw.strip():
                    captions.append(raw.strip())
                else:
                    problems[split].append(Problem(f"{where} sentences[{j}]", "empty caption"))
            if not captions:
                problems[split].append(Problem(where, "image has no caption"))
                continue
            image = resolve(root, Path(str(entry.get("filepath") or "")) / filename)
            image_id = entry.get("imgid", k)
            records[split].append(Record(image, tuple(captions),
                                         int(image_id) if isinstance(image_id, int) else k,
                                         where))
        return {s: FileSplit(records[s], problems[s]) for s in SPLITS}
