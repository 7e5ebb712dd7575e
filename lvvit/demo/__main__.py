"""``python -m lvvit.demo``: the whole product end to end on scikit-learn's digits.

Stages: digits -> JPEG ImageFolder -> shards; train a CNN teacher; label with it; train a
small LV-ViT with token labeling under DeepSpeed ZeRO-2 on two CPU ranks (MLflow);
export to ONNX + a Triton repository; serve with ``lvvit-serve`` and classify the
held-out images through ``tritonclient``; print a summary. Finished stages are reused on
a re-run unless ``--fresh``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from lvvit.bench.server_process import console_script as tool
from lvvit.demo.stages import StageFailed, StageRunner, run_command
from lvvit.errors import exits_on_error
from lvvit.ports import free_port


@dataclass(frozen=True)
class DemoSize:
    """Everything that makes the demo longer or shorter; ``--quick`` is the CI-sized one."""

    image_size: int = 64
    teacher_size: int = 32
    teacher_epochs: int = 8
    limit: int | None = None
    shard_size: int = 360
    epochs: int = 40
    micro_batch: int = 32
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 3
    stem_width: int = 32


QUICK = DemoSize(teacher_epochs=2, limit=200, shard_size=40, epochs=2, micro_batch=16,
                 embed_dim=48, depth=2, num_heads=2, stem_width=16)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lvvit.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="working folder (default: demo_out)")
    p.add_argument("--fresh", action="store_true", help="delete --out first and redo every stage")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run (CI), not for accuracy")
    p.add_argument("--epochs", type=int, default=None, help="LV-ViT training epochs (default: 40; quick: 2)")
    p.add_argument("--ranks", type=int, default=2, help="DeepSpeed CPU ranks (default: 2)")
    p.add_argument("--teacher-format", choices=("onnx", "torch"), default="onnx",
                   help="label with the teacher exported to ONNX (made dense by lvvit-label) or with its "
                   "PyTorch checkpoint (default: onnx)")
    return p.parse_args(argv)


class Demo:
    def __init__(self, out: Path, size: DemoSize, ranks: int, teacher_format: str = "onnx") -> None:
        self.out = out.resolve()
        self.size = size
        self.ranks = ranks
        self.teacher_format = teacher_format
        self.runner = StageRunner(self.out)
        self.logs = self.out / "logs"

    # --------------------------------------------------------------- stages
    def data(self) -> dict:
        from lvvit.demo.digits import write_digits_imagefolder

        images = self.out / "images"
        if images.exists():
            shutil.rmtree(images)
        counts = write_digits_imagefolder(images, self.size.image_size, limit=self.size.limit)
        for split in ("train", "val"):
            run_command([tool("lvvit-shards"), "build", str(images / split), "--out", str(self.out / "shards" / split),
                         "--prefix", split, "--shard-size", str(self.size.shard_size), "--overwrite"],
                        self.logs / f"shards-{split}.log")
        return counts

    def teacher(self) -> dict:
        from lvvit.demo.teacher import evaluate_teacher, train_teacher

        ckpt = self.out / "teacher.pt"
        result = train_teacher(self.out / "images" / "train", ckpt, self.size.teacher_size,
                               epochs=self.size.teacher_epochs)
        top1 = evaluate_teacher(ckpt, self.out / "images" / "val", self.size.teacher_size)
        return {**result, "val_top1": top1, "checkpoint": str(ckpt)}

    def label(self) -> dict:
        labeled = self.out / "labeled" / "train"
        run_command([tool("lvvit-label"), "--input", str(self.out / "shards" / "train"), "--out", str(labeled),
                     *self.teacher_args(), "--img-size", str(self.size.teacher_size), "--crop-pct", "1.0",
                     "--batch-size", "128"],
                    self.logs / "label.log")
        preview = self.out / "labels-preview.png"
        run_command([tool("lvvit-shards"), "preview", str(labeled), "--out", str(preview), "--n", "16",
                     "--crop", "--tokens", str(self.size.image_size // 16)], self.logs / "preview.log")
        manifest = json.loads((labeled / "manifest.json").read_text())
        return {"labeled_images": manifest["total"], "preview": str(preview), "teacher_format": self.teacher_format}

    def teacher_args(self) -> list[str]:
        """``--teacher`` for lvvit-label: the classifier exported to ONNX (lvvit-label makes
        it dense, as it would a user's timm or torchvision export), or the checkpoint."""
        checkpoint = self.out / "teacher.pt"
        if self.teacher_format == "torch":
            return ["--teacher", "smallcnn", "--teacher-checkpoint", str(checkpoint)]
        from lvvit.labeling.smallcnn import export_small_cnn_onnx

        onnx_file = self.out / "teacher.onnx"
        export_small_cnn_onnx(checkpoint, onnx_file, self.size.teacher_size)
        return ["--teacher", f"onnx:{onnx_file}"]

    def model_args(self) -> list[str]:
        s = self.size
        return ["--model", "lvvit_t", "--img-size", str(s.image_size),
                "--model-arg", f"embed_dim={s.embed_dim}", "--model-arg", f"depth={s.depth}",
                "--model-arg", f"num_heads={s.num_heads}", "--model-arg", f"stem_width={s.stem_width}"]

    def train(self) -> dict:
        labeled, val = self.out / "labeled" / "train", self.out / "shards" / "val"
        repo = Path(__file__).resolve().parents[2]
        cmd = [tool("deepspeed"), "--num_gpus", str(self.ranks), "--master_port", str(free_port()),
               str(repo / "train.py"), "--deepspeed_config", str(repo / "ds_configs" / "cpu.json"),
               *self.model_args(),
               "--train-shards", str(labeled), "--eval-shards", str(val),
               "--epochs", str(self.size.epochs), "--warmup-epochs", "2", "--cooldown-epochs", "0",
               "--micro-batch", str(self.size.micro_batch), "--lr", "2e-3", "--weight-decay", "0.05",
               # 8x8 scans upscaled: mirrored digits are other digits and a 0.08-area crop
               # is a blank patch, so the crop range is narrower and flips are off.
               "--scale", "0.35", "1.0", "--hflip", "0", "--randaug-ops", "1", "--randaug-magnitude", "5",
               "--reprob", "0", "--ema-decay", "0.99",
               "--workers", "1", "--output", str(self.out / "train"), "--save-every", "0",
               "--experiment", "lvvit-demo", "--run-name", "digits", "--log-every", "5"]
        env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
               "MLFLOW_TRACKING_URI": self.mlflow_uri(), "MLFLOW_DISABLE_TELEMETRY": "true"}
        run_command(cmd, self.logs / "train.log", env=env)
        weights = self.out / "train" / "weights.pth"
        if not weights.exists():
            raise RuntimeError(f"training finished but wrote no {weights}")
        run = json.loads((self.out / "train" / "mlflow_run.json").read_text())
        return {"weights": str(weights), "mlflow_run_id": run["run_id"]}

    def export(self) -> dict:
        export_dir, triton = self.out / "export", self.out / "triton"
        run_command([tool("lvvit-export"), *self.model_args(), "--num-classes", "10",
                     "--checkpoint", self.runner.results["train"]["weights"],
                     "--classes", str(self.out / "shards" / "train" / "classes.json"),
                     "--out", str(export_dir), "--triton-repo", str(triton), "--max-batch", "32",
                     "--overwrite"], self.logs / "export.log",
                    env={"MLFLOW_TRACKING_URI": self.mlflow_uri(), "MLFLOW_DISABLE_TELEMETRY": "true"})
        parity = json.loads((export_dir / "parity.json").read_text())
        return {"onnx": str(export_dir / "model.onnx"), "triton_repo": str(triton), "parity": parity,
                **self.export_int8(export_dir)}

    def export_int8(self, fp32_dir: Path) -> dict:
        """The int8 graph beside the fp32 one: held-out top-1 of both and their img/s."""
        from lvvit.demo.int8 import export_int8, images_per_second

        int8_dir = self.out / "export-int8"
        gate = export_int8(
            [tool("lvvit-export"), *self.model_args(), "--num-classes", "10",
             "--checkpoint", self.runner.results["train"]["weights"],
             "--classes", str(self.out / "shards" / "train" / "classes.json"), "--out", str(int8_dir),
             "--max-batch", "32", "--overwrite", "--no-mlflow", "--precision", "int8",
             "--calibration-shards", str(self.out / "shards" / "train"),
             "--eval-shards", str(self.out / "shards" / "val")],
            int8_dir, self.logs / "export-int8.log",
            env={**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"},
        )
        graphs = {"fp32": fp32_dir / "model.onnx"}
        if "refused" not in gate:
            graphs["int8"] = int8_dir / "model.onnx"
        return {"int8": gate, "images_per_second": images_per_second(graphs, self.size.image_size)}

    def serve(self) -> dict:
        from lvvit.demo.serve_check import classify_through_server

        return classify_through_server(
            self.out / "export", self.out / "images" / "val", Path(self.runner.results["train"]["weights"]),
            self.logs / "serve.log",
        )

    def mlflow_uri(self) -> str:
        return f"sqlite:///{self.out / 'mlflow.db'}"

    # --------------------------------------------------------------- driver
    def run(self) -> None:
        r = self.runner
        r.run("data", "digits -> JPEG ImageFolder -> shards (lvvit-shards build)", self.data,
              "scikit-learn is installed (make install); logs/shards-*.log")
        r.run("teacher", "train the CNN teacher on the training split", self.teacher,
              "the teacher's loss above; images/train holds 10 class folders")
        r.run("label", "label every training image with the teacher (lvvit-label)", self.label,
              "logs/label.log")
        r.run("train", f"train LV-ViT with token labeling, ZeRO-2 on {self.ranks} CPU ranks", self.train,
              "logs/train.log (each rank's lines are prefixed by the launcher)")
        r.run("export", "export to ONNX (parity checked), a Triton repository and an int8 graph "
              "(accuracy-gated)", self.export, "logs/export.log, logs/export-int8.log; parity.json "
              "in the export folders")
        r.run("serve", "serve with lvvit-serve and classify held-out images via tritonclient", self.serve,
              "logs/serve.log")
        self.summary()

    def summary(self) -> None:
        res = self.runner.results
        lines = [
            "", "=" * 72, "lvvit demo: summary", "=" * 72,
            f"held-out images:                 {res['data']['val']}",
            f"teacher (SmallCNN) top-1:        {res['teacher']['val_top1']:.4f}",
            f"LV-ViT top-1, PyTorch:           {res['serve']['torch_top1']:.4f}",
            f"LV-ViT top-1, via lvvit-serve:   {res['serve']['server_top1']:.4f}",
            f"server/PyTorch predictions agree: {res['serve']['agreement']:.4f}",
            f"ONNX Runtime vs PyTorch max |diff|: {parity_diff(res['export']['parity']):.2e}",
            *int8_lines(res["export"]),
            "", "time per stage:",
            *(f"  {name:<8} {rec['seconds']:8.1f} s" for name, rec in res.items()),
            "", "artifacts:",
            f"  shards:          {self.out / 'shards'}   (labeled: {self.out / 'labeled'})",
            f"  label preview:   {res['label']['preview']}",
            f"  weights:         {res['train']['weights']}",
            f"  ONNX + parity:   {self.out / 'export'}   (int8: {self.out / 'export-int8'})",
            f"  Triton repo:     {res['export']['triton_repo']}",
            "", "MLflow UI on the demo's runs:",
            f"  {tool('mlflow')} ui --backend-store-uri {self.mlflow_uri()} --port 5000",
        ]
        print("\n".join(lines), flush=True)


def int8_lines(export: dict) -> list[str]:
    """Held-out top-1 and one-thread img/s of the int8 graph next to the fp32 one."""
    gate, speed = export["int8"], export["images_per_second"]
    if "refused" in gate:
        lines = [f"int8 graph refused: {gate['refused']}"]
    else:
        lines = [f"held-out top-1, ONNX fp32 / int8: {gate['fp32_top1']:.4f} / {gate['int8_top1']:.4f} "
                 f"(agreement {gate['top1_agreement']:.4f}, {gate['images']} images)"]
    for batch, fp32 in speed["fp32"].items():
        int8 = speed.get("int8", {}).get(batch)
        lines.append(f"img/s batch {batch:>2}, 1 thread, fp32 / int8: {fp32:7.1f} / "
                     + (f"{int8:7.1f} ({int8 / fp32:.2f}x)" if int8 else "-"))
    return lines


def parity_diff(parity: dict) -> float:
    """Largest logit difference over the batch sizes lvvit-export checked."""
    return max(b["max_abs_diff"] for b in parity["onnxruntime"]["batches"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = QUICK if args.quick else DemoSize()
    if args.epochs is not None:
        from dataclasses import replace

        size = replace(size, epochs=args.epochs)
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    with exits_on_error():  # an error of ours in an in-process stage: its one line
        try:
            Demo(args.out, size, args.ranks, args.teacher_format).run()
        except StageFailed as exc:
            print(f"\nDEMO STOPPED: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
