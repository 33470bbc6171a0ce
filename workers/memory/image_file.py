"""Layer images in a file: what the disk tier streams, at 4096-aligned offsets after an index
(O_DIRECT reads whole aligned blocks)."""

from __future__ import annotations

import os
import struct

import numpy as np

ALIGN = 4096  # O_DIRECT's offset, length and address alignment on every common block device
MAGIC = b"NTRIMG01"
MAX_IMAGES = 1 << 16
_HEAD = struct.Struct("<8sQ")  # magic, image count
_ENTRY = struct.Struct("<qQQ")  # layer, offset, bytes


def align_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class ImageFile:
    """Layer images at 4096-aligned offsets, after a header indexing them: magic, count, then
    (layer, offset, bytes) per image in file order. Everything is checked when opened, so a
    reader never follows an offset out of the file."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.stat(self.path).st_size
        with open(self.path, "rb") as f:
            head = f.read(_HEAD.size)
            if len(head) < _HEAD.size:
                raise ValueError(f"{self.path}: {size} bytes, too short for a layer image header")
            magic, count = _HEAD.unpack(head)
            if magic != MAGIC:
                raise ValueError(f"{self.path}: not a layer image file (magic {magic!r})")
            if count > MAX_IMAGES:
                raise ValueError(f"{self.path}: header claims {count} images, at most {MAX_IMAGES}")
            table_end = _HEAD.size + count * _ENTRY.size
            if table_end > size:
                raise ValueError(f"{self.path}: the index of {count} images runs past the end of the file "
                                 f"({size} bytes)")
            table = f.read(count * _ENTRY.size)
        self.images: dict[int, tuple[int, int]] = {}  # layer -> (offset, bytes)
        end = table_end
        for layer, offset, nbytes in _ENTRY.iter_unpack(table):
            where = f"{self.path}: layer {layer}"
            if layer < 0 or layer in self.images:
                raise ValueError(f"{where}: negative or repeated layer")
            if offset % ALIGN:
                raise ValueError(f"{where}: offset {offset} is not 4096-aligned")
            if offset < end:
                raise ValueError(f"{where}: offset {offset} overlaps the index or the image before (ends at {end})")
            if nbytes == 0 or offset + nbytes > size:
                raise ValueError(f"{where}: {nbytes} bytes at offset {offset} do not fit in the file ({size} bytes)")
            self.images[layer] = (offset, nbytes)
            end = offset + nbytes

    @classmethod
    def create(cls, path: str | os.PathLike, sizes: list[tuple[int, int]]) -> ImageFile:
        """A file indexing (layer, bytes) images in this order, their bytes still zero (filled
        through `map`, or by `write`); it replaces any file at path whole (written beside it,
        then renamed), so no reader sees half of an index."""
        if len(sizes) > MAX_IMAGES:
            raise ValueError(f"{len(sizes)} images, at most {MAX_IMAGES}")
        layers = [int(layer) for layer, _ in sizes]
        if min(layers, default=0) < 0 or len(set(layers)) != len(layers):
            raise ValueError(f"layers must be distinct and non-negative: {layers}")
        if any(int(n) <= 0 for _, n in sizes):
            raise ValueError("an image is empty")
        offset = align_up(_HEAD.size + len(sizes) * _ENTRY.size)
        entries = []
        for layer, nbytes in sizes:
            entries.append((int(layer), offset, int(nbytes)))
            offset = align_up(offset + int(nbytes))
        path = os.fspath(path)
        partial = path + ".partial"
        with open(partial, "wb") as f:
            f.write(_HEAD.pack(MAGIC, len(entries)))
            for entry in entries:
                f.write(_ENTRY.pack(*entry))
            f.truncate(offset)  # the last image padded too: an O_DIRECT read of it is whole blocks
        os.replace(partial, path)
        return cls(path)

    @classmethod
    def write(cls, path: str | os.PathLike, images: list[tuple[int, object]]) -> ImageFile:
        """Write (layer, bytes-like) images in the given order."""
        views = [(int(layer), memoryview(image).cast("B")) for layer, image in images]
        made = cls.create(path, [(layer, view.nbytes) for layer, view in views])
        with open(made.path, "r+b") as f:
            for layer, view in views:
                f.seek(made.images[layer][0])
                f.write(view)
        return made

    def map(self) -> dict[int, np.ndarray]:
        """Writable views of each image, through one shared mapping of the file."""
        whole = np.memmap(self.path, dtype=np.uint8, mode="r+")
        return {layer: whole[off:off + n] for layer, (off, n) in self.images.items()}
