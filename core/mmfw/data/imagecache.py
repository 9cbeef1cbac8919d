"""An on-disk cache of decoded, resized images (``data.cache``), for small datasets.

Each split gets one memory-mapped uint8 file ``[N, 3, H, W]`` at the vision encoder's input
size, filled the first time an item is read (by whichever DataLoader worker reads it) and read
back without decoding after that, in later epochs and later runs. A flag file says which rows
are filled; a row is flagged only after it is written, so a killed run leaves no half image.
The file name holds a digest of the dataset, its options, the split and the size: change any of
them and a new file is made. Files changed on disk under the same names are not noticed:
delete the cache folder then.

The files are made at full size on disk (``posix_fallocate``, or zeros written), so a full disk
is a :class:`DataError` when the cache is made, never a SIGBUS in a worker writing the map
later; processes making the same cache at once each succeed and share one set of files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import Tensor

from ..spi.errors import DataError


def cache_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


class ImageCache:
    """``n`` uint8 images of ``size`` in ``directory/<key>.u8`` (+ ``.filled``, ``.ids``, and
    ``.ok``, the marker written once the three are complete).

    Several processes may make the same cache at once (the ranks of a torchrun job, sweep
    jobs sharing a folder): each writes its files under a name of its own, preallocated at
    full size, and hard-links them into place, which never replaces a file already there, so
    whoever is first wins and the others open that one. A file under its final name is always
    whole; ``.filled`` is placed last, so when it is there the other two are too.
    """

    def __init__(self, directory: str | Path, key: str, n: int, size: tuple[int, int]) -> None:
        self.dir = Path(directory).expanduser()
        self.n, self.size = n, (int(size[0]), int(size[1]))
        self.key = key
        self.pixels_path = self.dir / f"{key}.u8"
        self.flags_path = self.dir / f"{key}.filled"
        self.ids_path = self.dir / f"{key}.ids"
        self.marker_path = self.dir / f"{key}.ok"
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._create()

    @property
    def nbytes(self) -> int:
        return self.n * 3 * self.size[0] * self.size[1]

    def _files(self) -> tuple[tuple[Path, int], ...]:
        """Each file and its size in bytes, in the order they are placed (flags last)."""
        return ((self.pixels_path, self.nbytes), (self.ids_path, self.n * 8),
                (self.flags_path, self.n))

    def _marker(self) -> str:
        return json.dumps({"n": self.n, "size": list(self.size), "bytes": self.nbytes})

    def _create(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DataError(f"cannot make the image cache folder {self.dir} "
                            f"({err.strerror or err}): choose another data.cache folder or "
                            "turn the cache off (data.cache = \"\")") from None
        if self.marker_path.is_file():
            self._check(complete=True)
            return
        # flags first: they are placed last, so once they are seen the others were placed
        # before (looked at in placing order, another process could place all three between
        # the looks and the set would seem damaged)
        files = self._files()
        flags_there = files[-1][0].is_file()
        present = [path.is_file() for path, _ in files[:-1]] + [flags_there]
        if flags_there and not all(present):  # the others were lost
            self._damaged("files are missing")
        if not all(present):
            free = shutil.disk_usage(self.dir).free
            if self.nbytes > free:
                raise DataError(f"image cache for {self.n} images at {self.size[0]}x"
                                f"{self.size[1]} needs {_size(self.nbytes)} in {self.dir}, "
                                f"which has {_size(free)} free: choose another data.cache "
                                "folder or turn the cache off (data.cache = \"\")")
            for path, nbytes in self._files():
                if not path.is_file():
                    self._place(path, nbytes)
        self._check(complete=False)
        tmp = self._tmp(self.marker_path)
        try:
            tmp.write_text(self._marker(), encoding="utf-8")
            os.replace(tmp, self.marker_path)  # the same text whoever writes it
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise self._disk_error(err) from None

    def _tmp(self, path: Path) -> Path:
        return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")

    def _place(self, path: Path, nbytes: int) -> None:
        """Make ``path`` full of zeros, or find that another process made it first."""
        tmp = self._tmp(path)
        try:
            with open(tmp, "xb") as f:
                _preallocate(f.fileno(), nbytes)
            try:
                os.link(tmp, path)  # atomic and never replaces: the first one wins
            except FileExistsError:
                pass  # someone else made it first: theirs is used
            except OSError:  # a file system without hard links
                if not path.exists():
                    os.replace(tmp, path)
        except OSError as err:
            raise self._disk_error(err) from None
        finally:
            tmp.unlink(missing_ok=True)

    def _disk_error(self, err: OSError) -> DataError:
        full = err.errno in (errno.ENOSPC, errno.EDQUOT)
        why = "the disk is full" if full else (err.strerror or str(err))
        return DataError(f"cannot make the image cache in {self.dir} ({why}; it needs "
                         f"{_size(self.nbytes)} for {self.n} images at "
                         f"{self.size[0]}x{self.size[1]}): free space there, choose another "
                         "data.cache folder or turn the cache off (data.cache = \"\")")

    def _check(self, *, complete: bool) -> None:
        """Every file is there at its full size (and the marker matches) before use."""
        if complete and self.marker_path.read_text(encoding="utf-8").strip() != self._marker():
            self._damaged(f"{self.marker_path.name} does not match")
        for path, nbytes in self._files():
            try:
                got = path.stat().st_size
            except FileNotFoundError:
                self._damaged(f"{path.name} is missing")
            if got != nbytes:
                self._damaged(f"{path.name} is {got} bytes, not {nbytes}")

    def _damaged(self, why: str) -> NoReturn:
        raise DataError(f"the image cache {self.dir / self.key}.* is incomplete or damaged "
                        f"({why}): delete {self.key}.* in {self.dir} (or the whole folder) "
                        "and it is made again")

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


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _preallocate(fd: int, nbytes: int) -> None:
    """Reserve ``nbytes`` of disk for the file now, so a full disk is an error here and not a
    SIGBUS in whichever worker first writes a page of the memory map."""
    if nbytes <= 0:
        return
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is not None:
        try:
            fallocate(fd, 0, nbytes)
            return
        except OSError as err:
            if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
    chunk = bytes(min(nbytes, 1 << 20))
    left = nbytes
    while left:
        left -= os.write(fd, chunk[:left])
