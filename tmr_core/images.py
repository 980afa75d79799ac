"""Images for the extractor: load by URI, crop grounded regions (paper §3.2, V^r).

The real image ``v`` and its back-translation ``v'`` (Eq. 3) are read from local paths or
``s3://`` URIs through :mod:`tmr_core.storage`; the grounded regions (the ``regions`` /
``back_translation_regions`` columns, top boxes per phrase) are cropped from the image they were
detected on. Boxes partly outside the image are clamped to it; boxes with no area left are
dropped, so a sample ends up with 0 to ``num_regions`` crops and the collator masks the rest.
"""

from __future__ import annotations

import io
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence

from PIL import Image

from tmr_core import storage


def load_image(uri: str, options: storage.StorageOptions | None = None) -> Image.Image:
    """Read an image file (local path or ``s3://`` URI) as RGB.

    Raises:
        FileNotFoundError: nothing exists at ``uri``.
        ValueError: the bytes at ``uri`` are not an image PIL can decode.
    """
    if not storage.exists(uri, options):
        raise FileNotFoundError(f"image_uri {uri!r}: no such file")
    data = storage.read_bytes(uri, options)
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"image_uri {uri!r}: not a readable image ({decode_error(error)})") from error


def decode_error(error: BaseException) -> str:
    """PIL's reason without the object reprs it embeds (``<_io.BytesIO object at 0x…>``), so the
    same broken file gives the same message in every process and run."""
    return re.sub(r" ?<[^<>]* at 0x[0-9a-fA-F]+>", "", str(error))


def check_decodes(data: bytes, uri: str) -> None:
    """Raise ``ValueError`` unless ``data`` is an image PIL fully decodes, as :func:`load_image` will.

    ``Image.verify()`` checks the header (and PNG checksums) without decoding the pixels, so a
    truncated JPEG passes it and fails only when a later stage loads it, after hours of work
    and outside the ingestion's missing-image policy. Decoding it here costs one image read.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()  # checksums that decoding alone does not look at
        with Image.open(io.BytesIO(data)) as image:  # verify() leaves the image unusable: reopen
            image.load()
    except Exception as error:  # PIL raises many types for a broken file; all mean "unreadable"
        raise ValueError(f"{uri} is not a readable image ({error})") from error


def clamp_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int] | None:
    """Clamp ``[x1, y1, x2, y2]`` (pixels) to the image; ``None`` when no area is left."""
    if len(box) != 4:
        raise ValueError(f"regions: box {list(box)} is not [x1, y1, x2, y2]")
    x1, y1, x2, y2 = (float(v) for v in box)
    left, top = max(0, int(round(min(x1, x2)))), max(0, int(round(min(y1, y2))))
    right, bottom = min(width, int(round(max(x1, x2)))), min(height, int(round(max(y1, y2))))
    if right - left < 1 or bottom - top < 1:
        return None
    return left, top, right, bottom


def top_regions(regions: Sequence[Mapping] | None, limit: int) -> list[Mapping]:
    """The ``limit`` regions with the highest ``score`` (stable for ties), as grounding ranks them."""
    if not regions or limit <= 0:
        return []
    ranked = sorted(regions, key=lambda region: -float(region.get("score") or 0.0))
    return list(ranked[:limit])


def crop_regions(image: Image.Image, regions: Sequence[Mapping] | None, limit: int) -> list[Image.Image]:
    """Crop the top-``limit`` regions (``{box, score, phrase}``) out of ``image``.

    Returns between 0 and ``limit`` RGB crops, best score first; a region whose box leaves no
    area inside the image is skipped and the next one takes its place (the collator pads and masks).
    """
    crops = []
    for region in top_regions(regions, len(regions or ())):
        if len(crops) == limit:
            break
        box = clamp_box(_listed_box(region.get("box")), image.width, image.height)
        if box is not None:
            crops.append(image.crop(box))
    return crops


def _listed_box(box) -> list:
    if box is None:
        return []
    return list(box.tolist() if hasattr(box, "tolist") else box)


class PixelCache:
    """Processed pixels by key, least recently used dropped first, at most ``max_bytes`` in all
    (0: keeps nothing). Training reads the same images every epoch, and on the tiny CPU models
    the image processor costs a quarter to a third of a step; the processor handles each image on
    its own, so a kept tensor equals a freshly processed one. Values are tuples of tensors (None
    allowed); store copies, as a view keeps its whole batch alive."""

    def __init__(self, max_bytes: int = 0):
        self.max_bytes = max_bytes
        self._entries: OrderedDict = OrderedDict()
        self._bytes = 0

    @staticmethod
    def _size(value: tuple) -> int:
        return sum(t.numel() * t.element_size() for t in value if t is not None)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: object) -> tuple | None:
        if key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return self._entries[key]

    def put(self, key: object, value: tuple) -> None:
        size = self._size(value)
        if size > self.max_bytes or key in self._entries:
            return
        self._entries[key] = value
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= self._size(old)
