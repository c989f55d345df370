"""View pairs per CPU core: moco-ray's CPU view path vs an official-style plain PyTorch/PIL pipeline, side by side.

Both columns take the same encoded JPEG bytes in the same process on one thread (``torch.set_num_threads(1)``) and
make two augmented views per image with the MoCo v2 preset; CPU time (``time.process_time``) is measured, rounds
alternate between the two columns, and pairs/s = pairs / CPU seconds summed over the rounds.

- ``plain``: MoCo's official recipe: ``Image.open(...).convert("RGB")``, then per view torchvision transforms on
  the PIL image: RandomResizedCrop(S, scale=(0.2, 1)), RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
  RandomGrayscale(0.2), RandomApply([GaussianBlur(sigma in [0.1, 2])], p=0.5) (the official PIL-filter class;
  224 px only: the official CIFAR recipe has no blur, as our preset), RandomHorizontalFlip, ToTensor; the views
  of a batch collated with ``torch.stack`` (as a DataLoader does). No Normalize (ours normalises on the device).
- ``ours``: `moco_ray.data.views.make_pairs` (the Ray Data map_batches body, called directly) on batches of
  --batch rows with a seed: decode, per-row seeded parameters, two uint8 views per image, [B, 3, S, S] arrays.

Inputs: 32 px: cifar10-mini JPEGs (real 32x32 CIFAR-10 images; generated smooth JPEGs when absent) -> 32 px views;
224 px: real photographs (scikit-learn's china.jpg and flower.jpg, 427x640) cut at random offsets and scales into
~500x375 / 375x500 crops, re-encoded as JPEG q=90 (ImageNet-like files) -> 224 px views.

What we found (2026-12-02, this script): before this change our path made 0.4-0.6x the plain pipeline's pairs per
CPU-second. The time went to (1) the shared parameter sampler called once per image (about 50 tiny torch ops,
~330 us per image: more than the whole plain pipeline spends on a 32 px pair), and (2) torchvision's uint8
tensor kernels on single small images (hue and Gaussian blur in particular: float conversions and several passes
each), about 2x Pillow's C loops for the same op. Now each row's draws come from its own generator (exactly the
same draws as before) and are turned into crop boxes for the whole batch in one vectorised call, and every view
is made with Pillow: one ``resize(box=...)`` for crop + resize, lookup tables for brightness and contrast (the
values of ImageEnhance's blends, computed once per view instead of a full-image blend), Pillow's blend / HSV /
GaussianBlur for saturation, hue and blur, a grey view kept single-band until the final copy, and one
channels-last copy into the batch array (no float ToTensor). Images are decoded lazily: the header's size (EXIF
orientation applied) suffices to draw the crops, and a JPEG whose crops are all >= 2x the output side is decoded
at 1/2..1/8 size by libjpeg (``Image.draft``); for ~500x375 -> 224 px this never applies (a 224 px crop is rarely
448 px on both sides); it pays for big photos (2560x1708 JPEG -> 224 px: 21 ms per pair with draft, 53 without).

Usage: python benchmarks/bench_views.py [--cifar-images 1000] [--photos 200] [--rounds 3] [--out views.json]
Prints a table, the JSON, and a line to paste into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

from moco_ray.data.views import make_pairs

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


class PilGaussianBlur:
    """MoCo v2's official blur: PIL GaussianBlur filter with sigma ~ U[0.1, 2.0] (radius = sigma)."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, x: Image.Image) -> Image.Image:
        return x.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def plain_transform(size: int):
    """The official MoCo v2 augmentation (v2 "aug+"), blur only at >= 64 px as in the official CIFAR demo."""
    ops = [
        T.RandomResizedCrop(size, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    if size >= 64:
        ops.append(T.RandomApply([PilGaussianBlur((0.1, 2.0))], p=0.5))
    ops += [T.RandomHorizontalFlip(), T.ToTensor()]
    return T.Compose(ops)


def plain_pairs(images: list[bytes], tf, batch: int) -> int:
    """Official-style: PIL decode, two transformed views per image, batches collated with torch.stack."""
    n = 0
    for s in range(0, len(images), batch):
        qs, ks = [], []
        for data in images[s : s + batch]:
            img = Image.open(io.BytesIO(data)).convert("RGB")
            qs.append(tf(img))
            ks.append(tf(img))
        torch.stack(qs), torch.stack(ks)
        n += len(qs)
    return n


def ours_pairs(images: list[bytes], size: int, batch: int) -> int:
    n = 0
    for s in range(0, len(images), batch):
        chunk = images[s : s + batch]
        b = {
            "image": np.array(chunk, dtype=object),
            "label": np.zeros(len(chunk), dtype=np.int64),
            "id": np.array([f"img{s + i}" for i in range(len(chunk))], dtype=object),
        }
        out = make_pairs(b, preset="v2", image_size=size, strength=1.0, device="cpu", seed=0, epoch_offset=0)
        n += len(out["q"])
    return n


def cifar_jpegs(count: int) -> tuple[list[bytes], str]:
    try:
        files = common.train_files(common.CIFAR_MINI)
    except FileNotFoundError:
        return [common.smooth_jpeg(i, 32, 32) for i in range(count)], "generated 32x32 JPEGs (no cifar10-mini)"
    step = max(1, len(files) // count)
    return [f.read_bytes() for f in files[::step][:count]], f"cifar10-mini JPEGs ({common.CIFAR_MINI})"


def photo_jpegs(count: int, seed: int = 0) -> tuple[list[bytes], str]:
    """~500x375 / 375x500 JPEGs (q=90) cut from scikit-learn's two sample photographs at random offsets/scales."""
    from sklearn.datasets import load_sample_images  # lazy: about a second to import; only the photo set needs it

    photos = [Image.fromarray(a) for a in load_sample_images().images]  # 427x640 each
    rng = random.Random(seed)
    out = []
    for i in range(count):
        src = photos[i % len(photos)]
        w, h = (500, 375) if rng.random() < 0.7 else (375, 500)
        zoom = rng.uniform(1.0, 1.6)  # cut a (w, h) / zoom window that fits the source, resize it to (w, h)
        f = min(1.0 / zoom, src.width / w, src.height / h)
        cw, ch = round(w * f), round(h * f)
        left, top = rng.randint(0, src.width - cw), rng.randint(0, src.height - ch)
        crop = src.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out, "crops of sklearn china.jpg/flower.jpg, ~500x375 and 375x500, JPEG q=90"


def measure(images: list[bytes], size: int, rounds: int, batch: int) -> dict[str, Any]:
    tf = plain_transform(size)
    ours_pairs(images[:batch], size, batch)  # warm-up: imports, caches
    plain_pairs(images[:batch], tf, batch)
    cpu = {"plain": 0.0, "ours": 0.0}
    pairs = {"plain": 0, "ours": 0}
    for _ in range(rounds):
        for name in ("plain", "ours"):
            t0 = time.process_time()
            n = plain_pairs(images, tf, batch) if name == "plain" else ours_pairs(images, size, batch)
            cpu[name] += time.process_time() - t0
            pairs[name] += n
    rate = {k: pairs[k] / cpu[k] for k in cpu}
    return {
        "image_size": size,
        "images": len(images),
        "mean_jpeg_bytes": float(np.mean([len(b) for b in images])),
        "rounds": rounds,
        "cpu_s": cpu,
        "plain_pairs_per_s": rate["plain"],
        "ours_pairs_per_s": rate["ours"],
        "ratio": rate["ours"] / rate["plain"],
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cifar-images", type=int, default=1000)
    ap.add_argument("--photos", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--sizes", default="32,224", help="comma-separated subset of 32,224")
    ap.add_argument("--out", default="", help="write the JSON here")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    random.seed(0)
    torch.manual_seed(0)
    sizes = [int(s) for s in a.sizes.split(",") if s]
    res: dict[str, Any] = {"machine": common.machine(), "cpu_model": cpu_model(), "date": common.today(), "cases": {}}
    for size in sizes:
        if size == 32:
            images, what = cifar_jpegs(a.cifar_images)
        elif size == 224:
            images, what = photo_jpegs(a.photos)
        else:
            raise ValueError(f"--sizes: {size} is not one of 32, 224")
        case = measure(images, size, a.rounds, a.batch)
        case["input"] = what
        res["cases"][str(size)] = case
        print(
            f"{size:>4} px  {what}: plain {case['plain_pairs_per_s']:.0f} pairs/s, "
            f"ours {case['ours_pairs_per_s']:.0f} pairs/s, ratio {case['ratio']:.2f}x",
            flush=True,
        )
    figures = "; ".join(
        f"{c['image_size']} px: plain {common.fmt_rate(c['plain_pairs_per_s'])} pairs/s, "
        f"ours {common.fmt_rate(c['ours_pairs_per_s'])} pairs/s (x{c['ratio']:.2f})"
        for c in res["cases"].values()
    )
    cmd = "python benchmarks/bench_views.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res["results_line"] = common.results_line(cmd, figures + " (1 thread, CPU time, same images, same process)")
    common.write_json(a.out, res)
    print(f"RESULTS.md: {res['results_line']}")
    return res


if __name__ == "__main__":
    main()
