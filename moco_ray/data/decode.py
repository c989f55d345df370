"""Encoded image bytes -> uint8 tensors, ingest-time validation, and corrupt-image accounting in the stream.

Corrupt images in the stream (possible when shards were written by something else than `ingest`, or damaged
after it) are never dropped silently and never drop a row: every decode path (`decode_batch`, `decode_batch_on`
and the CPU views of `moco_ray.data.views`) replaces each one by another image of the same batch by the one rule
of `replacement_rows`, and flags it in a per-row ``corrupt`` column that the training loop sums and logs. Keeping
the row count keeps every worker's step count equal (MoCo all-gathers every step, so an uneven shard would hang
DDP).

Images of more than 8 bits per sample come out in 0..255 by one rule (`to_rgb`), whichever path decodes them:
16-bit (PNG, TIFF: PIL mode ``I;16``) scaled by 255/65535, as torchvision's own 16-bit PNG decode; 32-bit float
(TIFF mode ``F``) within 0..1 times 255, and 32-bit integer (mode ``I``) within 0..255 as it is; any other float or
integer image has its own min..max (finite values; NaN is 0) stretched to 0..255, so it is never all black or all
white. Pillow's plain ``convert("RGB")`` clips instead: a 0..1 float image came out all black, a 16-bit one nearly
all white.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

# Formats the stream can decode (torchvision for JPEG/PNG/GIF/WEBP, PIL for the others).
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
FALLBACK_SIZE = 32  # side of the gray stand-in when a whole batch is corrupt


class CorruptImageError(ValueError):
    """Image bytes that no decoder accepts."""


class TooManyCorruptImages(ValueError):
    """More corrupt images in an epoch than ``data.max_corrupt_fraction`` allows: a data problem the user fixes
    (re-ingest, or raise the limit), reported as one line, not as a crash."""


def sniff_format(data: bytes) -> str | None:
    """The image format from the first bytes (cheap header check), or None."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def verify_image(data: bytes) -> str:
    """Header check plus a full PIL decode; returns the format, raises CorruptImageError with the reason."""
    if not data:
        raise CorruptImageError("empty file (0 bytes)")
    fmt = sniff_format(data)
    if fmt is None:
        raise CorruptImageError(f"not an image (unknown header {data[:8]!r})")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # structure and checksums (PNG CRCs), without decoding
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # full decode: catches truncated JPEG scans that verify() lets through
            if im.width < 1 or im.height < 1:
                raise CorruptImageError("image has no pixels")
    except CorruptImageError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise CorruptImageError(f"undecodable {fmt} ({type(e).__name__}: {e})") from None
    return fmt


def decode_image(data: bytes) -> torch.Tensor:
    """Encoded bytes -> uint8 [3, H, W] RGB (grayscale, palette and RGBA become RGB), EXIF orientation applied.

    torchvision's decoders first (fast, libjpeg-turbo / libpng), PIL as the fallback for the formats they lack;
    raises CorruptImageError when neither can decode the bytes. A photo stored sideways with an EXIF orientation
    tag comes out upright, as ``PIL.ImageOps.exif_transpose`` turns it.
    """
    import torch  # lazy: ingest validates with PIL alone and loads no torch (1.2 s of every ingest command)

    if not data:
        raise CorruptImageError("empty image bytes")
    from torchvision.io import ImageReadMode  # lazy: torchvision only to decode; the driver imports this module
    from torchvision.io import decode_image as tv_decode  # lazy: as the line above

    try:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        img = tv_decode(buf, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except Exception:  # unsupported format or corrupt: let PIL decide
        img = _pil_decode(data)
    if img.ndim == 4:  # animated GIF: first frame
        img = img[0]
    if img.dtype != torch.uint8:  # 16-bit PNG
        img = (img.to(torch.float32) * (255.0 / torch.iinfo(img.dtype).max)).round().to(torch.uint8)
    return img.contiguous()


def to_rgb(im: Image.Image) -> Image.Image:
    """`im` as 8-bit RGB; 16-bit, integer and float greyscale scaled to 0..255 by the rule in the module docstring."""
    if im.mode in ("F", "I") or im.mode.startswith("I;16"):
        im = Image.fromarray(_wide_to_uint8(np.asarray(im), im.mode))
    return im if im.mode == "RGB" else im.convert("RGB")


def _wide_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """One band of more than 8 bits -> uint8 (see the module docstring for the rule)."""
    a = a.astype(np.float64)
    if mode.startswith("I;16"):
        scaled = a * (255.0 / 65535.0)
    else:
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if lo >= 0.0 and hi <= (1.0 if mode == "F" else 255.0):
            scaled = a * (255.0 if mode == "F" else 1.0)
        else:
            scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def _pil_decode(data: bytes) -> torch.Tensor:
    import torch  # lazy: ingest validates with PIL alone and loads no torch (1.2 s of every ingest command)

    try:
        im, _ = load_upright_rgb(open_image(data))
        arr = np.asarray(im)
    except CorruptImageError:
        raise
    except Exception as e:
        raise CorruptImageError(f"corrupt image ({type(e).__name__}: {e})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees (width and height swap)


def open_image(data: bytes) -> Image.Image:
    """A lazily decoded PIL image (header read, pixels not yet decoded); CorruptImageError if unreadable.

    With :func:`upright_size` and :func:`load_upright_rgb`, a caller can plan crops on the upright image's size
    before decoding, and decode a JPEG at a reduced size (``draft``) when every crop is far larger than its output.
    """
    if not data:
        raise CorruptImageError("empty image bytes")
    try:
        im = Image.open(io.BytesIO(data))
        if im.width < 1 or im.height < 1:
            raise CorruptImageError("image has no pixels")
    except CorruptImageError:
        raise
    except Exception as e:
        raise CorruptImageError(f"corrupt image ({type(e).__name__}: {e})") from None
    return im


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1..8; 1 = upright, also when absent or unreadable)."""
    try:
        o = int(im.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:
        return 1
    return o if 1 <= o <= 8 else 1


def upright_size(im: Image.Image) -> tuple[int, int]:
    """(height, width) of the image once its EXIF orientation is applied."""
    w, h = im.size
    return (w, h) if exif_orientation(im) in _SWAPS_SIDES else (h, w)


def load_upright_rgb(im: Image.Image, reduce: int = 1) -> tuple[Image.Image, tuple[float, float]]:
    """Decode an :func:`open_image` image: EXIF orientation applied (as ``ImageOps.exif_transpose``), RGB.

    ``reduce`` in (2, 4, 8) decodes a JPEG at 1/reduce of its size in the DCT (libjpeg's scaled decoding via
    ``Image.draft``: far cheaper than a full decode); other formats ignore it. Returns the image and its scale
    ``(sx, sy)`` relative to the full-size upright image: its width over the full-size upright width, its height
    over the full-size upright height ((1.0, 1.0) exactly when not reduced), for scaling crop boxes drawn on the
    full-size upright image. The two differ when a side is not a multiple of ``reduce`` (libjpeg rounds each side
    up on its own: 1077 x 784 at 1/8 is 135 x 98), so one scale for both axes would put a box on the bottom or
    right edge outside the reduced image. Raises CorruptImageError when the pixel data cannot be decoded.
    """
    try:
        w0, h0 = im.size
        orientation = exif_orientation(im)
        up_w, up_h = (h0, w0) if orientation in _SWAPS_SIDES else (w0, h0)  # full-size upright sides
        if reduce > 1 and im.format == "JPEG":
            # Pillow picks the largest factor k in (8, 4, 2) with size // requested >= k on both sides: asking
            # for the floor sizes gives k = reduce (the rounded-up sizes gave reduce / 2 for a side not a multiple
            # of reduce).
            im.draft("RGB", (max(1, w0 // reduce), max(1, h0 // reduce)))
        if orientation != 1:
            im = ImageOps.exif_transpose(im)  # decodes, then rotates / mirrors
        else:
            im.load()
        im = to_rgb(im)
    except Exception as e:
        raise CorruptImageError(f"corrupt image ({type(e).__name__}: {e})") from None
    # measured on the upright result, so both scales are in upright coordinates (orientations 5-8 swap the sides)
    return im, (im.width / up_w, im.height / up_h)


def decode_batch(images: Sequence[bytes | None]) -> tuple[list[torch.Tensor], np.ndarray]:
    """Decode a batch; each corrupt image is replaced by the nearest valid image of the batch and flagged.

    Returns (images uint8 [3,H,W] each, corrupt flags int64 [B]). A batch with no valid image at all yields
    mid-gray stand-ins (all flagged), so the row count, and hence every worker's step count, is unchanged.
    """
    import torch  # lazy: ingest validates with PIL alone and loads no torch (1.2 s of every ingest command)

    out: list[torch.Tensor | None] = []
    for data in images:
        try:
            out.append(decode_image(data) if data is not None else None)
        except CorruptImageError:
            out.append(None)
    return replace_corrupt(out, lambda: torch.full((3, FALLBACK_SIZE, FALLBACK_SIZE), 128, dtype=torch.uint8))


def replacement_rows(valid: Sequence[bool]) -> list[int]:
    """The corrupt-image rule of every decode path: the row whose image row i uses.

    Itself when its image is valid; else the nearest valid image of the batch (the lower index on a tie), so the
    row keeps its own view draws on a real image; else -1, when the batch has no valid image at all: a mid-grey
    ``FALLBACK_SIZE`` stand-in. No row is dropped (see the module docstring).
    """
    ok = [i for i, v in enumerate(valid) if v]
    return [i if v else (min(ok, key=lambda j: (abs(j - i), j)) if ok else -1) for i, v in enumerate(valid)]


def corrupt_flags(rows: Sequence[int]) -> np.ndarray:
    """int64 [B]: 1 where `replacement_rows` gave a row another image (or the stand-in)."""
    return np.array([j != i for i, j in enumerate(rows)], dtype=np.int64)


def replace_corrupt(decoded: Sequence[T | None], stand_in: Callable[[], T]) -> tuple[list[T], np.ndarray]:
    """`replacement_rows` applied to a decoded batch (None = corrupt): (each row's image, corrupt flags int64 [B]).

    ``stand_in()`` makes one mid-grey image per row of an all-corrupt batch."""
    rows = replacement_rows([x is not None for x in decoded])
    return [decoded[j] if j >= 0 else stand_in() for j in rows], corrupt_flags(rows)  # type: ignore[misc]


def _jpeg_on_device_ok(data: bytes | None) -> bool:
    """A JPEG the batched decoder can take: upright (nvJPEG cannot apply EXIF orientation, so rotated photos go to
    the CPU decoder); the cheap byte check skips the header parse for the common no-EXIF file."""
    if not data or sniff_format(data) != "JPEG":
        return False
    if b"Exif\x00\x00" not in data[:65536]:
        return True
    try:
        return exif_orientation(open_image(data)) == 1
    except CorruptImageError:
        return False


def _batched_jpeg(bufs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """torchvision's batched JPEG decode (nvJPEG on CUDA); on an error (it returns nothing partial) each one alone,
    None for those that still fail."""
    from torchvision.io import ImageReadMode, decode_jpeg  # lazy: torchvision only to decode (see decode_image)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
        try:
            return list(decode_jpeg(bufs, mode=ImageReadMode.RGB, device=device))
        except Exception:
            out: list[torch.Tensor | None] = []
            for b in bufs:
                try:
                    out.append(decode_jpeg(b, mode=ImageReadMode.RGB, device=device))
                except Exception:
                    out.append(None)
            return out


def decode_batch_on(
    images: Sequence[bytes | None], device: torch.device | str
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """`decode_batch` with the decoded images on `device`: the ``aug.device=gpu`` decode.

    Upright JPEGs are decoded in one batched call on the device (nvJPEG when it is CUDA, libjpeg-turbo on the CPU);
    PNG and the other formats, EXIF-rotated JPEGs and JPEGs the batched decoder rejects are decoded on the CPU
    (`decode_image`) and copied over. Corrupt rows are replaced and flagged by `replacement_rows`, as in
    `decode_batch`. Returns (uint8 [3, H, W] each, on `device`; corrupt flags int64 [B], CPU).
    """
    import torch  # lazy: ingest validates with PIL alone and loads no torch (1.2 s of every ingest command)

    device = torch.device(device)
    out: list[torch.Tensor | None] = [None] * len(images)
    fast = [i for i, d in enumerate(images) if _jpeg_on_device_ok(d)]
    if fast:
        bufs = [torch.frombuffer(bytearray(images[i]), dtype=torch.uint8) for i in fast]  # type: ignore[arg-type]
        for i, img in zip(fast, _batched_jpeg(bufs, device), strict=True):
            out[i] = img
    for i, data in enumerate(images):
        if out[i] is None and data is not None:
            try:
                out[i] = decode_image(data).to(device, non_blocking=True)
            except CorruptImageError:
                pass
    imgs, corrupt = replace_corrupt(
        out, lambda: torch.full((3, FALLBACK_SIZE, FALLBACK_SIZE), 128, dtype=torch.uint8, device=device)
    )
    return imgs, torch.from_numpy(corrupt)
