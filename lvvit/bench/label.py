"""lvvit-label's speed with the same small CNN as a torch teacher and as an ONNX teacher,
and what the labels cost on disk against the official one-``.pt``-file-per-image maps.

Like for like: one SmallCNN (widths 32-64-128, 1000 classes, BN statistics made
non-trivial) is saved as a checkpoint (``--teacher smallcnn``) and exported to ONNX as
the plain classifier it is (``--teacher onnx:``, made dense by lvvit-label). At 144 px
its map is 18 x 18, the official maps' grid. Both label the same shards of real
photographs (crops of the scikit-learn sample photos, 500-1000 px, JPEG q90) with the
labeler lvvit-label runs (decode threads, teacher, tlm encoding, tar writing), in
alternating rounds; the median round counts and the ratio onnx / torch is printed last.
``--threads`` is the per-rank thread count (torch and ONNX Runtime alike).

Cost model, per 1000 images, from the tlm records this run wrote: ours adds one tar
member per sample to shards that exist anyway (record + 512-byte header, padded to 512
bytes) and no files; the official format writes one ``torch.save`` file of ``[2, 5, 18,
18]`` fp16 per image (measured with the same maps), 1000 files, each taking whole
4 KiB blocks on a typical file system.
"""

from __future__ import annotations

import argparse
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from lvvit.bench.data import cpu_info, sample_jpegs, write_bench_shards
from lvvit.data.label_bytes import official_bytes
from lvvit.data.labelmap import decode_tlm
from lvvit.data.tarsamples import iter_tar_samples
from lvvit.errors import LvvitError
from lvvit.labeling.labeler import Labeler
from lvvit.labeling.onnx_teacher import load_onnx_teacher
from lvvit.labeling.smallcnn import SmallCNN, SmallCNNConfig, export_small_cnn_onnx, save_small_cnn
from lvvit.labeling.teacher import build_teacher

TAR_BLOCK, FS_BLOCK = 512, 4096


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=256, help="photos to label per round (default 256)")
    parser.add_argument("--img-size", type=int, default=144, help="teacher input size; 144 gives 18 x 18 maps (default)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per teacher forward (default 64)")
    parser.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime threads, as one rank (default 1)")
    parser.add_argument("--workers", type=int, default=1, help="decode threads (default 1)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per teacher; the median counts (default 5)")
    parser.add_argument("--seed", type=int, default=0)


def make_teachers(folder: Path, img_size: int, seed: int) -> dict[str, torch.nn.Module]:
    """The same SmallCNN as lvvit-label builds it from a checkpoint and from its ONNX export."""
    torch.manual_seed(seed)
    model = SmallCNN(SmallCNNConfig(num_classes=1000, widths=(32, 64, 128)))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    save_small_cnn(model, folder / "smallcnn.pt")
    export_small_cnn_onnx(folder / "smallcnn.pt", folder / "smallcnn.onnx", img_size)
    return {
        "torch": build_teacher("smallcnn", folder / "smallcnn.pt", img_size),
        "onnx": load_onnx_teacher(folder / "smallcnn.onnx", img_size),
    }


def label_round(labeler: Labeler, shards: list[Path], out: Path) -> tuple[float, float]:
    """Wall and CPU seconds (all threads of this process) to label every shard into ``out``,
    as lvvit-label's per-rank loop does. CPU seconds are much steadier on a shared machine."""
    out.mkdir(parents=True, exist_ok=True)
    wall, cpu = time.perf_counter(), time.process_time()
    for shard in shards:
        labeler.label_shard(iter_tar_samples(shard), out / shard.name)
    return time.perf_counter() - wall, time.process_time() - cpu


def tlm_records(shards: list[Path]) -> list[bytes]:
    records = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            records += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".tlm")]
    return records


def _padded(size: int, block: int) -> int:
    return -(-size // block) * block


def cost_model(records: list[bytes]) -> dict[str, float]:
    """Bytes and files per 1000 images: tlm members in shards vs one official .pt per image."""
    scale = 1000 / len(records)
    official = [official_bytes(decode_tlm(r)) for r in records]
    return {
        "grid": decode_tlm(records[0]).values.shape,
        "ours_bytes": scale * sum(TAR_BLOCK + _padded(len(r), TAR_BLOCK) for r in records),
        "ours_record_bytes": float(np.mean([len(r) for r in records])),
        "official_bytes": scale * sum(official),
        "official_disk_bytes": scale * sum(_padded(b, FS_BLOCK) for b in official),
        "official_file_bytes": float(np.mean(official)),
    }


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    print(f"machine: {cpu_info()[0]}; {args.threads} thread(s), {args.workers} decode thread(s); "
          f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="lvvit-bench-label-") as tmp:
        folder = Path(tmp)
        (folder / "in").mkdir()
        write_bench_shards(folder / "in", sample_jpegs(args.images, args.seed), per_shard=64)
        shards = sorted((folder / "in").glob("*.tar"))
        teachers = make_teachers(folder, args.img_size, args.seed)
        labelers = {
            name: Labeler(teacher, args.img_size, batch_size=args.batch_size, workers=args.workers)
            for name, teacher in teachers.items()
        }
        print(f"{args.images} photos in {len(shards)} shards, teacher at {args.img_size} px, batch {args.batch_size}")
        for name, labeler in labelers.items():  # warm-up: first-call allocations, ORT graph setup
            label_round(labeler, shards[:1], folder / f"warm-{name}")
        seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in labelers}
        for r in range(args.rounds):
            for name, labeler in labelers.items():
                seconds[name].append(label_round(labeler, shards, folder / f"{name}-{r}"))
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{n} {args.images / s[-1][0]:.1f} img/s ({args.images / s[-1][1]:.1f} per CPU s)"
                for n, s in seconds.items()
            ))
        for labeler in labelers.values():
            labeler.close()
        rate = {name: args.images / statistics.median(w for w, _ in s) for name, s in seconds.items()}
        cpu_rate = {name: args.images / statistics.median(c for _, c in s) for name, s in seconds.items()}
        _check_same_labels(folder / "torch-0", folder / "onnx-0", shards)
        cost = cost_model(tlm_records([folder / "onnx-0" / s.name for s in shards]))
    k, h, w = cost["grid"]
    print(f"\nlvvit-label, median of {args.rounds} rounds: torch teacher {rate['torch']:.1f} img/s "
          f"({cpu_rate['torch']:.1f} per CPU second), ONNX teacher {rate['onnx']:.1f} img/s "
          f"({cpu_rate['onnx']:.1f} per CPU second)")
    print(f"\nlabels per 1000 images (top-{k}, {h}x{w} maps, this run's records):")
    print(f"  ours: {cost['ours_bytes'] / 1e6:.2f} MB added to existing shards (record {cost['ours_record_bytes']:.0f} B "
          "+ tar header, 512-byte padded), 0 files")
    print(f"  official: {cost['official_bytes'] / 1e6:.2f} MB in 1000 files ({cost['official_file_bytes']:.0f} B each; "
          f"{cost['official_disk_bytes'] / 1e6:.2f} MB on disk with 4 KiB blocks)")
    print(f"speed ratio (ONNX teacher / torch teacher): {rate['onnx'] / rate['torch']:.2f}x images/s, "
          f"{cpu_rate['onnx'] / cpu_rate['torch']:.2f}x images per CPU second")


def _check_same_labels(torch_out: Path, onnx_out: Path, shards: list[Path]) -> None:
    """The two teachers must agree, or the speed comparison means nothing."""
    for a, b in zip(tlm_records([torch_out / s.name for s in shards]), tlm_records([onnx_out / s.name for s in shards]),
                    strict=True):
        ma, mb = decode_tlm(a), decode_tlm(b)
        agree = (ma.indices[0] == mb.indices[0]).mean()
        if agree < 0.99 or np.abs(ma.values.astype(np.float32) - mb.values.astype(np.float32)).max() > 1e-2:
            raise LvvitError("the torch and ONNX teachers disagree; the benchmark is void")
