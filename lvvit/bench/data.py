"""Training input speed per worker process, and label-map bytes.

Like for like on real photographic JPEGs (crops of the scikit-learn sample photos,
500-1000 px on the long side, quality 90): the same RandomResizedCrop boxes, interpolations
and flips, to one image tensor each,

* naive: full PIL decode, PIL crop then resize, ToTensor + Normalize on the CPU (float32);
* ours: decode only what the crop needs (JPEG DCT scaling to the smallest size that keeps
  the crop at least the output size, and no rows below the crop), crop + antialiased
  resize on torch's vectorised uint8 kernels, uint8 out. Normalisation runs on the
  device in training, so it is not in the worker figure; a second row adds it on this
  CPU to show what it would cost here.

Also timed: the full training transform (RandAugment m9 mstd0.5 x2, random erasing 0.25,
an 18 x 18 top-5 label map moved with the geometric ops), and the bytes of our ``tlm``
record against the official ``torch.save`` maps (``lvvit.data.label_bytes``). Speed is
images per CPU second of the one process (one thread), i.e. per worker process; rounds
alternate the pipelines and the median round counts.

``--source http`` measures the shard source instead: the same images in shards on local
disk and served by a loopback HTTP server that the benchmark starts, read by the real
training loader (resampled shards, shuffle buffer, full train transform); wall-clock
images/s of each after its first batch (which is timed apart), rounds alternating, and the
ratio http / local.

``--source sampling`` measures exact epochs (``train_loader(sampling="epoch")``): the
loader's wall-clock images/s in epoch mode against resampled mode on the same shards,
rounds alternating (ratio epoch / resampled), and the time to resume at the middle of an
epoch of 1,000 tiny shards (construct the loader from the saved position, first batch out)
against the time it took to read that half epoch (ratio resume / half epoch).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import http.server
import io
import json
import platform
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lvvit.data.decode import IMAGENET_MEAN, IMAGENET_STD, normalize
from lvvit.data.label_bytes import label_bytes_report, photo_label_maps
from lvvit.data.labelmap import LabelMap, centre_square_box
from lvvit.loader.transforms import RANDOM_INTERPOLATION, TrainTransform, sample_crop_box


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=None,
                        help="sample JPEGs to cut from the photos (default 64; 512 with --source http or s3, "
                        "8 shards of 64)")
    parser.add_argument("--img-size", type=int, default=224, help="output crop size (default 224)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per pipeline; the median counts (default 5)")
    parser.add_argument("--passes", type=int, default=2, help="passes over the images per round (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", choices=("memory", "http", "s3", "sampling"), default="memory",
                        help="memory: per-worker transform speed (default); http: the training loader over "
                        "shards on local disk vs the same shards through a loopback HTTP server; s3: the same "
                        "through a loopback S3 server (lvvit.bench.data_s3); sampling: "
                        "exact epochs vs resampling, and the cost of resuming mid-epoch")
    parser.add_argument("--resume-shards", type=int, default=1000,
                        help="tiny shards in the resume measurement of --source sampling (default 1000)")
    parser.add_argument("--workers", type=int, default=2, help="loader processes with --source http (default 2)")


def sample_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """Random crops (70-100% of each side) of the scikit-learn sample photos, resized to a
    long side of 500-1000 px, a quarter of them portrait, saved at JPEG quality 90."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = int(photo.width * rng.uniform(0.7, 1.0)), int(photo.height * rng.uniform(0.7, 1.0))
        x, y = rng.randint(0, photo.width - w), rng.randint(0, photo.height - h)
        crop = photo.crop((x, y, x + w, y + h))
        if rng.random() < 0.25:
            crop = crop.transpose(Image.Transpose.ROTATE_90)
        scale = rng.uniform(500, 1000) / max(crop.size)
        crop = crop.resize((round(crop.width * scale), round(crop.height * scale)), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        crop.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def naive_sample(data: bytes, size: int, rng: random.Random) -> torch.Tensor:
    """What torchvision's ImageFolder + RandomResizedCrop + RandomHorizontalFlip + ToTensor +
    Normalize do per image (their code paths, written out: no torchvision here)."""
    img = Image.open(io.BytesIO(data)).convert("RGB")  # pil_loader
    left, top, w, h = sample_crop_box(img.width, img.height, rng)
    img = img.crop((left, top, left + w, top + h)).resize((size, size), rng.choice(RANDOM_INTERPOLATION))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.array(img, np.uint8, copy=True)).view(size, size, 3)  # ToTensor
    x = x.permute((2, 0, 1)).contiguous().to(dtype=torch.float32).div(255)
    mean = torch.as_tensor(IMAGENET_MEAN, dtype=x.dtype).view(-1, 1, 1)  # Normalize
    std = torch.as_tensor(IMAGENET_STD, dtype=x.dtype).view(-1, 1, 1)
    return x.sub_(mean).div_(std)


def ours_sample(transform: TrainTransform) -> Callable[[bytes, random.Random], torch.Tensor]:
    return lambda data, rng: torch.from_numpy(transform(data, None, rng).image).permute(2, 0, 1)


def ours_cpu_normalized(transform: TrainTransform) -> Callable[[bytes, random.Random], torch.Tensor]:
    ours = ours_sample(transform)
    return lambda data, rng: normalize(ours(data, rng)[None])[0]


def full_decode(data: bytes, rng: random.Random) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB")))


def _cpu_seconds(fn: Callable[[bytes, random.Random], object], jpegs: list[bytes], passes: int, seed: int) -> np.ndarray:
    """CPU seconds of this process per image (mean over passes): the cost of one worker
    process, and much steadier than wall time while other jobs share the machine."""
    rng = random.Random(seed)  # same seed per pipeline: same boxes, interpolations, flips
    seconds = np.zeros(len(jpegs))
    for _ in range(passes):
        for i, data in enumerate(jpegs):
            start = time.process_time()
            fn(data, rng)
            seconds[i] += time.process_time() - start
    return seconds / passes


def cpu_info() -> tuple[str, set[str]]:
    """The CPU's model name and feature flags (``/proc/cpuinfo``), which benchmark output
    names so that a figure says what machine it came from."""
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not name:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return name or platform.processor() or "unknown CPU", flags


def write_bench_shards(folder: Path, jpegs: list[bytes], per_shard: int) -> None:
    """The JPEGs as shards with ``manifest.json`` (docs/format.md), class = index mod 10."""
    import webdataset as wds

    entries = []
    for start in range(0, len(jpegs), per_shard):
        name = f"bench-{start // per_shard:06d}.tar"
        chunk = jpegs[start : start + per_shard]
        with wds.TarWriter(str(folder / name)) as sink:
            for i, data in enumerate(chunk, start):
                sink.write({"__key__": f"s{i:06d}", "jpg": data, "cls": str(i % 10).encode()})
        entries.append({"name": name, "samples": len(chunk)})
    (folder / "manifest.json").write_text(json.dumps({"shards": entries, "total": len(jpegs)}))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class LoaderRound:
    """One round of one source: seconds from building the loader to its first batch (worker
    start and the shuffle buffer's first fill), images/s from there to the end, and the
    round's wall-clock seconds."""

    first_batch_s: float
    steady_rate: float
    seconds: float


def interleaved_rates(specs: dict[str, str], args: argparse.Namespace, steps: int) -> dict[str, list[LoaderRound]]:
    """Each source's ``LoaderRound`` over ``args.rounds`` rounds, the sources taking turns
    within a round so that machine noise hits them alike; one short warm-up pass each first
    (imports, page cache, clients)."""
    for spec in specs.values():
        _loader_round(spec, args, 2)
    rounds: dict[str, list[LoaderRound]] = {name: [] for name in specs}
    for r in range(args.rounds):
        for name, spec in specs.items():
            rounds[name].append(_loader_round(spec, args, steps))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {v[-1].steady_rate:.1f} img/s (first batch {v[-1].first_batch_s:.2f} s)" for n, v in rounds.items()))
    return rounds


def report_rates(rounds: dict[str, list[LoaderRound]], names: dict[str, str]) -> None:
    """Print the medians of each source and the ratio of the second to the first (the
    target's figure: steady images/s, the first batch excluded)."""
    (base, base_name), (other, other_name) = names.items()
    rate = {n: statistics.median(r.steady_rate for r in rounds[n]) for n in names}
    first = {n: statistics.median(r.first_batch_s for r in rounds[n]) for n in names}
    print(f"\ntraining loader after its first batch, images/s (median of rounds): {base_name} {rate[base]:.1f}, "
          f"{other_name} {rate[other]:.1f}")
    print(f"to the first batch (worker start, shuffle buffer fill; median): {base_name} {first[base]:.2f} s, "
          f"{other_name} {first[other]:.2f} s")
    print(f"speed ratio ({other} / {base}, after the first batch; target >= 0.9x): {rate[other] / rate[base]:.2f}x")


def _loader_round(spec: str, args: argparse.Namespace, steps: int) -> LoaderRound:
    """One epoch of ``steps`` batches of the training loader over ``spec``, timed.

    The first batch is timed apart: it pays for starting the workers and filling the
    shuffle buffer, once per loader, which a benchmark epoch of a few hundred images would
    weigh a hundred times more than an epoch of ImageNet does."""
    from lvvit.loader.pipeline import train_loader

    loader = train_loader(spec, batch_size=32, img_size=args.img_size, num_workers=args.workers,
                          shuffle_buffer=256, steps_per_epoch=steps, seed=args.seed, label_maps=False)
    start = time.perf_counter()
    batches = iter(loader)
    next(batches)
    first = time.perf_counter()
    images = sum(batch["images"].shape[0] for batch in batches)
    end = time.perf_counter()
    return LoaderRound(first - start, images / max(end - first, 1e-9), end - start)


def run_http(args: argparse.Namespace) -> None:
    """Local shards vs the same shards over loopback HTTP, in one run, rounds alternating."""
    torch.set_num_threads(1)
    jpegs = sample_jpegs(args.images, args.seed)
    with tempfile.TemporaryDirectory(prefix="lvvit-bench-") as tmp:
        folder = Path(tmp)
        write_bench_shards(folder, jpegs, per_shard=max(1, len(jpegs) // 8))
        handler = functools.partial(_QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        specs = {"local": str(folder), "http": f"http://127.0.0.1:{server.server_port}/"}
        steps = max(2, args.passes * len(jpegs) // 32)
        print(f"machine: {cpu_info()[0]}; {len(jpegs)} JPEGs in 8 shards, {args.workers} loader workers, "
              f"batch 32 at {args.img_size}, {steps} batches per round")
        try:
            rounds = interleaved_rates(specs, args, steps)
        finally:
            server.shutdown()
            server.server_close()
    report_rates(rounds, {"local": "local disk", "http": "loopback HTTP"})


def _sampling_rate(spec: str, args: argparse.Namespace, sampling: str, epochs: int) -> float:
    """Wall-clock images/s over ``epochs`` iterations of the training loader (each one
    epoch, workers started anew, as the trainer runs them)."""
    from lvvit.loader.pipeline import train_loader

    loader = train_loader(spec, batch_size=32, img_size=args.img_size, num_workers=args.workers,
                          shuffle_buffer=256, seed=args.seed, label_maps=False, sampling=sampling, world_size=1)
    start = time.perf_counter()
    images = sum(batch["images"].shape[0] for _ in range(epochs) for batch in loader)
    return images / (time.perf_counter() - start)


def _first_batch_seconds(spec: str, kwargs: dict) -> float:
    """Seconds from building the training loader to its first batch in hand (the loader's
    workers are ended after the timing)."""
    from lvvit.loader.pipeline import train_loader

    start = time.perf_counter()
    batches = iter(train_loader(spec, **kwargs))
    next(batches)
    seconds = time.perf_counter() - start
    batches.close()
    return seconds


def tiny_jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def run_sampling(args: argparse.Namespace) -> None:
    """Epoch vs resampled throughput, then resume at mid-epoch vs reading the half epoch."""
    from lvvit.loader.pipeline import train_loader

    torch.set_num_threads(1)
    jpegs = sample_jpegs(args.images, args.seed)
    with tempfile.TemporaryDirectory(prefix="lvvit-bench-") as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        write_bench_shards(folder, jpegs, per_shard=max(1, len(jpegs) // 8))
        print(f"machine: {cpu_info()[0]}; {len(jpegs)} JPEGs in 8 shards, {args.workers} loader workers, "
              f"batch 32 at {args.img_size}, shuffle buffer 256, {args.passes} epochs per round")
        for sampling in ("epoch", "resampled"):  # warm-up: imports, page cache
            _sampling_rate(str(folder), args, sampling, 1)
        rates: dict[str, list[float]] = {"epoch": [], "resampled": []}
        for r in range(args.rounds):
            for sampling in rates:
                rates[sampling].append(_sampling_rate(str(folder), args, sampling, args.passes))
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {v[-1]:.1f} img/s" for n, v in rates.items()))

        tiny = Path(tmp) / "tiny"
        tiny.mkdir()
        images = [tiny_jpeg(i) for i in range(16)]
        per_shard = 16
        write_bench_shards(tiny, [images[i % 16] for i in range(args.resume_shards * per_shard)], per_shard)
        common = {"batch_size": 16, "img_size": 32, "num_workers": args.workers, "shuffle_buffer": 256,
                  "seed": args.seed, "label_maps": False, "randaugment": None, "sampling": "epoch", "world_size": 1}
        first = train_loader(str(tiny), **common)
        half = len(first) // 2
        batches = iter(first)
        start = time.perf_counter()
        for _ in range(half):
            next(batches)
        read_half = time.perf_counter() - start
        position = json.loads(json.dumps(first.position()))
        batches.close()  # its workers end here, not inside a timing below
        starts: dict[str, list[float]] = {"fresh": [], "resume": []}
        for _ in range(max(1, args.rounds)):  # alternating: fresh start, resume
            starts["fresh"].append(_first_batch_seconds(str(tiny), common))
            starts["resume"].append(_first_batch_seconds(str(tiny), {**common, "position": position}))
    epoch, resampled = statistics.median(rates["epoch"]), statistics.median(rates["resampled"])
    resume, fresh = statistics.median(starts["resume"]), statistics.median(starts["fresh"])
    print(f"\ntraining loader, images/s (median of rounds): epoch {epoch:.1f}, resampled {resampled:.1f}")
    print(f"resume at the middle of an epoch of {args.resume_shards} shards x {per_shard} tiny JPEGs "
          f"({half} of {2 * half} batches of 16): reading the half epoch {read_half:.2f} s; to the first batch "
          f"(median of {len(starts['resume'])}, min in brackets): resume {resume:.3f} s "
          f"({min(starts['resume']):.3f}), fresh start {fresh:.3f} s ({min(starts['fresh']):.3f}); "
          f"the resume's own cost over a fresh start: {resume - fresh:+.3f} s")
    print(f"speed ratio (epoch / resampled; target >= 0.97x): {epoch / resampled:.2f}x")
    print(f"resume ratio (resume to first batch / reading the half epoch; target < 5%): {100 * resume / read_half:.1f}% "
          f"(of which a fresh start {100 * fresh / read_half:.1f}%, the resume's own cost "
          f"{100 * (resume - fresh) / read_half:+.1f}%)")


def run(args: argparse.Namespace) -> None:
    if args.images is None:
        args.images = 512 if args.source in ("http", "s3") else 64
    if args.source == "http":
        run_http(args)
        return
    if args.source == "sampling":
        run_sampling(args)
        return
    if args.source == "s3":
        from lvvit.bench.data_s3 import run_s3

        run_s3(args)
        return
    torch.set_num_threads(1)  # one worker process = one core
    size = args.img_size
    print(f"machine: {cpu_info()[0]}, {torch.get_num_threads()} thread per worker; Pillow {Image.__version__}")
    jpegs = sample_jpegs(args.images, args.seed)
    sizes = [Image.open(io.BytesIO(d)).size for d in jpegs]
    print(
        f"data: {len(jpegs)} JPEGs q90, {min(min(s) for s in sizes)}-{max(max(s) for s in sizes)} px, "
        f"mean {np.mean([len(d) for d in jpegs]) / 1024:.0f} KiB; output {size}x{size}"
    )
    plain = TrainTransform(img_size=size, randaugment=None, erase_prob=0.0)
    full = TrainTransform(img_size=size)
    maps = [
        dataclasses.replace(m, box=centre_square_box(*s))
        for m, s in zip(photo_label_maps(len(jpegs), seed=args.seed), sizes, strict=True)
    ]
    map_of = dict(zip(jpegs, maps, strict=True))

    def full_train(data: bytes, rng: random.Random) -> tuple[torch.Tensor, LabelMap]:
        sample = full(data, map_of[data], rng)
        return torch.from_numpy(sample.image).permute(2, 0, 1), sample.label_map

    pipelines: dict[str, Callable[[bytes, random.Random], object]] = {
        "naive: full decode, crop+resize, float normalize": lambda d, r: naive_sample(d, size, r),
        "ours: crop-aware decode, torch AA resize, uint8": ours_sample(plain),
        "ours + normalize on this CPU": ours_cpu_normalized(plain),
        "full decode only (reference)": full_decode,
        "ours, full train transform (RA m9 x2, erase, map)": full_train,
    }
    for fn in pipelines.values():  # warm-up: imports, caches
        _cpu_seconds(fn, jpegs[:4], 1, args.seed)
    seconds: dict[str, list[np.ndarray]] = {name: [] for name in pipelines}
    for r in range(args.rounds):
        for name, fn in pipelines.items():
            seconds[name].append(_cpu_seconds(fn, jpegs, args.passes, args.seed + r))
        print(f"round {r + 1}/{args.rounds} done")
    long_side = np.array([max(s) for s in sizes])
    groups = {"all": long_side > 0, "long side < 750": long_side < 750, ">= 750": long_side >= 750}
    rate = {
        (name, group): statistics.median(mask.sum() / t[mask].sum() for t in runs)
        for name, runs in seconds.items()
        for group, mask in groups.items()
        if mask.any()
    }
    print("\nimages per CPU second, one worker process (median of rounds):")
    print(f"  {'':<52}" + "".join(f"{f'{g} ({m.sum()})':>22}" for g, m in groups.items()))
    for name in pipelines:
        print(f"  {name:<52}" + "".join(f"{rate.get((name, g), float('nan')):>22.1f}" for g in groups))

    report = label_bytes_report(seed=args.seed)
    print(
        f"\nlabel maps ({report['grid']}x{report['grid']}, top-{report['k']}, {report['maps']} maps; {report['teacher']}):\n"
        f"  official torch.save [2,k,H,W] fp16: {report['official_bytes']:.0f} B; "
        f"tlm photo-like: {report['photo_bytes']:.0f} B; tlm random: {report['random_bytes']:.0f} B "
        f"(max ratio {report['random_ratio_max']:.3f})"
    )
    naive, ours = "naive: full decode, crop+resize, float normalize", "ours: crop-aware decode, torch AA resize, uint8"
    by_size = ", ".join(f"{rate[ours, g] / rate[naive, g]:.2f}x {g}" for g in list(groups)[1:] if (ours, g) in rate)
    print(f"\nfull train transform: {rate['ours, full train transform (RA m9 x2, erase, map)', 'all']:.1f} images/s per worker")
    print(
        f"speed ratio (ours uint8 / naive, per worker; target >= 1.5x): {rate[ours, 'all'] / rate[naive, 'all']:.2f}x "
        f"({by_size}; {rate['ours + normalize on this CPU', 'all'] / rate[naive, 'all']:.2f}x with normalize on the CPU)"
    )
    print(
        f"label bytes ratio (tlm / official; target <= 0.5x photo, <= 1.0x random): "
        f"{report['photo_ratio']:.3f}x photo-like, {report['random_ratio']:.3f}x random"
    )
