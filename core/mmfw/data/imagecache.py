"""An on-disk cache of decoded, resized images (``data.cache``), for small datasets.

Each split gets one memory-mapped uint8 file ``[N, 3, H, W]`` at the vision encoder's input
size, filled the first time an item is read (by whichever DataLoader worker reads it) and read
back without decoding after that, in later epochs and later runs. A flag file says which rows
are filled; a row is flagged only after it is written, so a killed run leaves no half image.
The file name holds a digest of the dataset, its options, the split and the size: change any of
them and a new file is made. Files changed on disk under the same names are not noticed:
delete the cache folder then.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..spi.errors import DataError


def cache_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


class ImageCache:
    """``n`` uint8 images of ``size`` in ``directory/<key>.u8`` (+ ``.filled``, ``.ids``)."""

    def __init__(self, directory: str | Path, key: str, n: int, size: tuple[int, int]) -> None:
        self.dir = Path(directory).expanduser()
        self.n, self.size = n, (int(size[0]), int(size[1]))
        self.key = key
        self.pixels_path = self.dir / f"{key}.u8"
        self.flags_path = self.dir / f"{key}.filled"
        self.ids_path = self.dir / f"{key}.ids"
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._create()

    @property
    def nbytes(self) -> int:
        return self.n * 3 * self.size[0] * self.size[1]

    def _create(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.pixels_path.is_file() and self.flags_path.is_file() and self.ids_path.is_file():
            return
        free = shutil.disk_usage(self.dir).free
        if self.nbytes > free:
            raise DataError(f"image cache for {self.n} images at {self.size[0]}x{self.size[1]} "
                            f"needs {self.nbytes / 2**30:.1f} GiB in {self.dir}, which has "
                            f"{free / 2**30:.1f} GiB free: choose another data.cache folder or "
                            "turn the cache off (data.cache = \"\")")
        for path, dtype, shape in ((self.pixels_path, np.uint8, (self.n, 3, *self.size)),
                                   (self.ids_path, np.int64, (self.n,)),
                                   (self.flags_path, np.uint8, (self.n,))):
            tmp = path.with_suffix(path.suffix + ".tmp")
            if self.n:
                np.memmap(tmp, dtype=dtype, mode="w+", shape=shape).flush()  # sparse zeros
            else:
                tmp.write_bytes(b"")
            tmp.replace(path)

    def _open(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = (
                np.memmap(self.pixels_path, dtype=np.uint8, mode="r+",
                          shape=(self.n, 3, *self.size)),
                np.memmap(self.ids_path, dtype=np.int64, mode="r+", shape=(self.n,)),
                np.memmap(self.flags_path, dtype=np.uint8, mode="r+", shape=(self.n,)),
            )
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:  # workers map the files themselves
        return {**self.__dict__, "_arrays": None}

    def get(self, i: int) -> tuple[Tensor, int] | None:
        """The cached image and its id, or None when row ``i`` is not filled yet."""
        if not self.n:
            return None
        pixels, ids, flags = self._open()
        if not flags[i]:
            return None
        return torch.from_numpy(np.array(pixels[i])), int(ids[i])

    def put(self, i: int, image: Tensor, image_id: int) -> None:
        pixels, ids, flags = self._open()
        pixels[i] = image.numpy()
        ids[i] = image_id
        flags[i] = 1  # after the pixels: a row is never flagged half written

    def filled(self) -> int:
        return int(np.count_nonzero(self._open()[2])) if self.n else 0
