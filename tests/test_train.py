"""Training end to end: real `deepspeed` launcher, two CPU ranks over gloo, tiny LV-ViT on
tiny shards where the colour is the class, tracked by a real `mlflow server`.

Few launches, many assertions each (every rank imports DeepSpeed, which is slow):
ZeRO-1 and ZeRO-3 with label maps and EMA, then `--eval-only` on the consolidated weights;
ZeRO-2 without maps SIGKILLed mid-epoch while checkpointing, resumed, and its last complete
checkpoint converted to a universal one and resumed on one rank (to --max-steps);
launcher-less single processes that fine-tune from a lower resolution and meet NaN
teacher logits (stop, and skip in bf16).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from lvvit.data.decode import normalize
from lvvit.data.labelmap import LabelMap, encode_tlm
from lvvit.digest import file_sha256
from lvvit.loader.pipeline import eval_loader
from lvvit.models import create_model
from lvvit.ports import free_port
from lvvit.train.checkpointing import EMA_FILE
from lvvit.train.schedule import WarmupCosineSchedule

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 220, 40)]
TINY = ["--model", "lvvit_t", "--img-size", "64", "--model-arg", "embed_dim=48", "--model-arg", "depth=2",
        "--model-arg", "num_heads=2", "--model-arg", "stem_width=16"]
TINY_ARGS = {"embed_dim": 48, "depth": 2, "num_heads": 2, "stem_width": 16}
# 192 train samples, micro batch 8 x 2 ranks: 12 steps/epoch; 2 cosine epochs + 1 cooldown = 36 steps
COMMON = [*TINY, "--micro-batch", "8", "--epochs", "2", "--cooldown-epochs", "1", "--warmup-epochs", "0.5",
          "--lr", "3e-3", "--min-lr", "1e-4", "--workers", "0", "--log-every", "1", "--save-every", "4",
          "--keep", "2", "--randaug-magnitude", "2", "--reprob", "0", "--no-system-metrics"]
TOTAL_STEPS = 36


def jpeg(colour: tuple[int, int, int], rng: np.random.Generator) -> bytes:
    pixels = np.clip(np.array(colour) + rng.normal(0, 12, (72, 88, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(folder: Path, samples: int, per_shard: int, tlm: bool, seed: int, nan_every: int = 0) -> Path:
    """Shards, manifest.json and classes.json per docs/contracts.md. The teacher map says
    the true class with logit 6 in every cell, a random runner-up with 1."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    shards = []
    for s in range(0, samples, per_shard):
        name = f"data-{s // per_shard:06d}.tar"
        count = min(per_shard, samples - s)
        with wds.TarWriter(str(folder / name)) as sink:
            for i in range(s, s + count):
                label = int(rng.integers(len(COLOURS)))
                sample = {"__key__": f"s{i:05d}", "jpg": jpeg(COLOURS[label], rng), "cls": str(label).encode()}
                if tlm:
                    values = np.stack([np.full((3, 3), 6.0), np.full((3, 3), 1.0)]).astype(np.float16)
                    if nan_every and i % nan_every == nan_every - 1:
                        values[0, 1, 1] = np.nan
                    other = (label + 1 + int(rng.integers(len(COLOURS) - 1))) % len(COLOURS)
                    indices = np.stack([np.full((3, 3), label), np.full((3, 3), other)]).astype(np.uint16)
                    sample["tlm"] = encode_tlm(LabelMap(values, indices, (0.0, 0.0, 1.0, 1.0)))
                sink.write(sample)
        shards.append({"name": name, "samples": count})
    (folder / "manifest.json").write_text(json.dumps({"shards": shards, "total": samples}))
    classes = [{"index": i, "name": f"colour{i}", "wnid": f"n{i:08d}"} for i in range(len(COLOURS))]
    (folder / "classes.json").write_text(json.dumps(classes))
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shards")
    return {
        "tlm": write_shards(root / "train_tlm", 192, 96, tlm=True, seed=0),
        "plain": write_shards(root / "train_plain", 192, 96, tlm=False, seed=1),
        "nan": write_shards(root / "train_nan", 192, 96, tlm=True, seed=2, nan_every=12),
        "eval": write_shards(root / "eval", 36, 20, tlm=False, seed=3),
    }


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("mlflow server exited") from None
            time.sleep(0.5)
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


def ds_config(tmp: Path, stage: int) -> Path:
    cfg = json.loads((REPO / "ds_configs" / "cpu.json").read_text())
    cfg["zero_optimization"] = {"stage": stage}
    path = tmp / f"zero{stage}_cpu.json"
    path.write_text(json.dumps(cfg))
    return path


def command(args: list[str], tracking_uri: str | None, ranks: int = 2,
            env_extra: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """``deepspeed --num_gpus RANKS train.py ARGS`` (``python train.py`` for 0) and its environment."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    if ranks:
        cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()),
               "train.py", *args]
    else:
        cmd = [sys.executable, "train.py", *args]
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
    return cmd, env


def launch(args: list[str], tracking_uri: str | None, ranks: int = 2, check: bool = True,
           env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd, env = command(args, tracking_uri, ranks, env_extra)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_args(out: Path, train: Path, eval_: Path, stage_cfg: Path, name: str) -> list[str]:
    return ["--deepspeed_config", str(stage_cfg), "--train-shards", f"{train}/data-{{000000..000001}}.tar",
            "--eval-shards", str(eval_), "--output", str(out), "--experiment", "lvvit-test", "--run-name", name,
            *COMMON]


def metric(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def engine_eval_vs_weights(out: Path, eval_dir: Path, client, run_id: str) -> None:
    """The consolidated weights (and EMA) reproduce the engine's last eval exactly."""
    payload = torch.load(out / "weights.pth", map_location="cpu")
    assert set(payload) == {"state_dict", "state_dict_ema", "model_args"}
    assert payload["model_args"] == {"name": "lvvit_t", "img_size": 64, "num_classes": 4, **TINY_ARGS}
    for key, prefix in (("state_dict", "eval"), ("state_dict_ema", "eval_ema")):
        model = create_model(**payload["model_args"])
        model.load_state_dict(payload[key], strict=True)
        model.eval()
        loss_sum, correct, n = 0.0, 0, 0
        with torch.no_grad():
            for batch in eval_loader(eval_dir, batch_size=8, img_size=64, crop_pct=0.9, num_workers=0,
                                     world_size=1, rank=0):
                logits = model(normalize(batch["images"]))
                valid = batch["valid"]
                loss = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
                loss_sum += loss[valid].sum().item()
                correct += (logits.argmax(1) == batch["labels"])[valid].sum().item()
                n += int(valid.sum())
        logged_loss = metric(client, run_id, f"{prefix}/loss")[-1]
        logged_top1 = metric(client, run_id, f"{prefix}/top1")[-1]
        assert logged_loss[0] == TOTAL_STEPS
        assert loss_sum / n == pytest.approx(logged_loss[1], rel=1e-4, abs=1e-5), prefix
        assert 100.0 * correct / n == pytest.approx(logged_top1[1], abs=1e-6), prefix


def test_zero1_and_zero3_learn_consolidate_and_track(data, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    for stage in (1, 3):
        out = tmp_path / f"zero{stage}"
        args = run_args(out, data["tlm"], data["eval"], ds_config(tmp_path, stage), f"zero{stage}")
        if stage == 1:  # system metrics on, sampled every second
            args.remove("--no-system-metrics")
        launch(args, mlflow_server, env_extra={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"})
        run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        losses = [v for _, v in metric(client, run_id, "train/loss")]
        assert len(losses) == TOTAL_STEPS
        assert np.mean(losses[-6:]) < np.mean(losses[:3]) - 0.4, losses
        assert metric(client, run_id, "eval/top1")[-1][1] > 70.0  # chance: 25
        for key in ("train/cls_loss", "train/aux_loss", "train/lr", "train/grad_norm", "train/images_per_sec",
                    "train/step_time", "eval/top5", "eval_ema/top1"):
            assert len(metric(client, run_id, key)) > 0, key
        if stage == 1:
            assert "system/cpu_utilization_percentage" in run.data.metrics
        params = run.data.params
        assert params["model"] == "lvvit_t" and params["lr"] == "0.003" and params["epochs"] == "2"
        assert params["ds.zero_optimization.stage"] == str(stage)
        assert params["resolved.micro_batch_source"] == "command line"
        assert params["resolved.grad_accum_source"] == "deepspeed config"
        assert params["resolved.global_batch"] == "16"
        tags = run.data.tags
        assert tags["zero_stage"] == str(stage) and tags["world_size"] == "2"
        assert tags["precision"] == "fp32" and tags["model"] == "lvvit_t" and len(tags["git_commit"]) >= 7
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        assert {"weights.pth", "classes.json", "ds_config.json"} <= artifacts
        train_spec = f"{data['tlm']}/data-{{000000..000001}}.tar"  # the spec as given: the two shards
        assert datasets(run) == {"training": (file_sha256(data["tlm"] / "manifest.json")[:32], train_spec),
                                 "eval": (file_sha256(data["eval"] / "manifest.json")[:32], str(data["eval"]))}
        ds_logged = json.loads(Path(client.download_artifacts(run_id, "ds_config.json", str(tmp_path))).read_text())
        assert ds_logged["train_batch_size"] == 16 and ds_logged["zero_optimization"]["stage"] == stage
        tags_on_disk = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
        assert tags_on_disk == ["step00000032", "step00000036"]  # keep 2, unique step tags
        engine_eval_vs_weights(out, data["eval"], client, run_id)
    eval_only_reproduces_final_eval(out, tmp_path, client, run_id, mlflow_server, data["eval"])


def eval_only_reproduces_final_eval(out: Path, tmp: Path, client, run_id: str, uri: str, eval_dir: Path) -> None:
    """``--eval-only --finetune weights.pth`` on the ZeRO-3 run's weights, two ranks, no train
    shards: the same numbers as the run's last eval (weights and EMA), in eval.json and in a
    new MLflow run; nothing trained, nothing saved, the training run's record untouched."""
    eval_out = tmp / "eval_only"
    launch(["--deepspeed_config", str(ds_config(tmp, 3)), "--eval-shards", str(eval_dir), "--output",
            str(eval_out), "--experiment", "lvvit-test", *COMMON, "--eval-only", "--finetune",
            str(out / "weights.pth")], uri)
    record = json.loads((eval_out / "eval.json").read_text())
    assert record["source"] == str(out / "weights.pth") and record["world_size"] == 2
    assert record["step"] == 0  # no optimizer step taken
    got = record["metrics"]
    assert got["eval/samples"] == got["eval_ema/samples"] == 36
    for key in ("eval/loss", "eval/top1", "eval/top5", "eval_ema/loss", "eval_ema/top1"):
        assert got[key] == pytest.approx(metric(client, run_id, key)[-1][1], rel=1e-5, abs=1e-6), key
    assert got["eval/loss"] != pytest.approx(got["eval_ema/loss"], rel=1e-6)  # two different weight sets
    # no checkpoints; only the eval run's own record, the one run its spool may replay into
    assert sorted(p.name for p in eval_out.iterdir()) == ["eval.json", "mlflow_eval_run.json"]
    runs = client.search_runs([client.get_run(run_id).info.experiment_id],
                              filter_string="params.eval_only = 'True'")
    assert len(runs) == 1 and runs[0].info.run_id != run_id and runs[0].info.status == "FINISHED"
    assert json.loads((eval_out / "mlflow_eval_run.json").read_text())["run_id"] == runs[0].info.run_id
    assert runs[0].data.metrics["eval_ema/top1"] == pytest.approx(got["eval_ema/top1"])
    assert "eval.json" in {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert datasets(runs[0]) == {"eval": (file_sha256(eval_dir / "manifest.json")[:32], str(eval_dir))}


def datasets(run) -> dict[str, tuple[str, str]]:
    """The run's MLflow datasets: context -> (digest, source URI)."""
    found = {}
    for di in run.inputs.dataset_inputs:
        context = {t.key: t.value for t in di.tags}["mlflow.data.context"]
        found[context] = (di.dataset.digest, json.loads(di.dataset.source)["uri"])
    return found


def kill_when_saving(args: list[str], tracking_uri: str, tag_dir: Path, log: Path) -> None:
    """Start a two-rank run and SIGKILL the launcher's process group (launcher and ranks) the
    moment ``tag_dir`` appears, i.e. while that checkpoint is being written or just after."""
    cmd, env = command(args, tracking_uri)
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.time() + 300
            while not tag_dir.exists():
                assert proc.poll() is None, f"run ended before {tag_dir.name}:\n{log.read_text()[-4000:]}"
                assert time.time() < deadline, f"no {tag_dir.name} after 300 s"
                time.sleep(0.005)
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
    for _ in range(100):  # the ranks die with the launcher: nothing of the group is left
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("rank processes survived the kill")


def assert_complete(tag_dir: Path, ranks: int) -> None:
    """Every file a two-rank ZeRO-2 tag with EMA needs, each one readable."""
    expected = {"mp_rank_00_model_states.pt", EMA_FILE,
                *(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(ranks)),
                *(f"lvvit_rng_rank{r}.pt" for r in range(ranks)), *(f"lvvit_buffers_rank{r}.pt" for r in range(ranks))}
    assert expected <= {p.name for p in tag_dir.iterdir()}, sorted(p.name for p in tag_dir.iterdir())
    for name in expected:
        torch.load(tag_dir / name, map_location="cpu", weights_only=False)


def test_killed_run_resumes_like_an_uninterrupted_one(data, mlflow_server, tmp_path):
    """SIGKILL mid-epoch while a checkpoint is being written; --resume loses only the steps
    since the last complete one, follows the same lr schedule to the same last step and
    continues the same MLflow run. Then that checkpoint, made universal, resumes on one rank."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    out = tmp_path / "zero2"
    ckpts = out / "checkpoints"
    args = run_args(out, data["plain"], data["eval"], ds_config(tmp_path, 2), "zero2-resume")
    kill_when_saving(args, mlflow_server, ckpts / "step00000008", tmp_path / "killed.log")
    latest = (ckpts / "latest").read_text()
    assert latest in ("step00000004", "step00000008")  # step 8 only if its save had completed
    assert_complete(ckpts / latest, ranks=2)
    resumed = int(latest.removeprefix("step"))
    first = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    assert client.get_run(first).info.status == "RUNNING"  # nobody closed it
    killed_at = max(s for s, _ in metric(client, first, "train/lr"))
    assert resumed <= killed_at < 12  # killed mid-epoch (12 steps each)
    universal = to_universal(ckpts / latest, tmp_path / "universal" / "checkpoints")

    proc = launch([*args, "--resume"], mlflow_server)
    assert f"resumed at step {resumed} (epoch 0, step {resumed} in it)" in proc.stderr + proc.stdout
    assert json.loads((out / "mlflow_run.json").read_text())["run_id"] == first
    run = client.get_run(first)
    assert run.info.status == "FINISHED"
    lrs = metric(client, first, "train/lr")
    steps = [s for s, _ in lrs]
    # every step once, except those trained after the checkpoint and lost with the kill
    assert steps == sorted([*range(1, TOTAL_STEPS + 1), *range(resumed + 1, killed_at + 1)])
    schedule = WarmupCosineSchedule(lr=3e-3, min_lr=1e-4, warmup_lr=1e-6, warmup_epochs=0.5, epochs=2,
                                    steps_per_epoch=12)
    # DeepSpeed's lr after optimizer step s is the schedule at s (the scheduler has stepped s times)
    assert [v for _, v in lrs] == pytest.approx([schedule.lr_at(s) for s in steps], rel=1e-9)
    assert [s for s, _ in metric(client, first, "eval/top1")] == [12, 24, 36]  # one per epoch
    losses = [v for _, v in metric(client, first, "train/loss")]
    assert np.mean(losses[-6:]) < np.mean(losses[:3]) - 0.4, losses  # ZeRO-2 learns too
    assert metric(client, first, "eval/top1")[-1][1] > 70.0  # chance: 25
    final = torch.load(ckpts / "step00000036" / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)
    assert final["global_steps"] == TOTAL_STEPS and final["lvvit"]["epoch"] == 3
    assert (ckpts / "latest").read_text() == "step00000036"
    payload = torch.load(out / "weights.pth", map_location="cpu")
    assert "state_dict_ema" in payload

    # the same stopped checkpoint, converted to a universal one, resumes on one rank
    # (accumulating 2 micro batches keeps the global batch, hence the schedule, the same)
    uni_out = universal.parent.parent
    args = run_args(uni_out, data["plain"], data["eval"], ds_config(tmp_path, 2), "universal")
    stop = resumed + 3
    proc = launch([*args, "--no-mlflow", "--no-eval", "--grad-accum", "2", "--max-steps", str(stop),
                   "--resume", str(universal), "--universal"], None, ranks=0)
    assert f"resumed at step {resumed} (epoch 0, step {resumed} in it)" in proc.stderr + proc.stdout
    assert "x accum 2 (command line) x 1 ranks = 16" in proc.stderr + proc.stdout
    state = torch.load(uni_out / "checkpoints" / f"step{stop:08d}" / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)
    assert state["global_steps"] == stop and state["lvvit"]["step_in_epoch"] == stop
    assert state["lr_scheduler"]["last_epoch"] == stop
    assert state["lr_scheduler"]["_last_lr"][0] == pytest.approx(schedule.lr_at(stop), rel=1e-9)


def to_universal(tag_dir: Path, checkpoints: Path) -> Path:
    """DeepSpeed's converter, then our EMA and RNG files beside it (docs/training.md)."""
    target = checkpoints / f"{tag_dir.name}_universal"
    checkpoints.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
                    "--output_folder", str(target)], check=True, capture_output=True,
                   env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}, timeout=300)
    for extra in tag_dir.glob("lvvit_*.pt"):
        shutil.copy(extra, target / extra.name)
    return target


def test_nan_targets_stop_or_skip_and_finetune_one_process(data, tmp_path):
    """``python train.py`` (no launcher): fine-tunes a 32 px checkpoint at 64 px (pos_embed
    resized), then meets teacher maps with NaN logits: stops by default, skips on request."""
    small = create_model("lvvit_t", img_size=32, num_classes=4, **TINY_ARGS)
    torch.save({"state_dict": small.state_dict()}, tmp_path / "small.pth")
    out = tmp_path / "nan"
    args = ["--train-shards", str(data["nan"]), "--output", str(out), "--no-mlflow", "--no-eval",
            "--deepspeed_config", str(REPO / "ds_configs" / "cpu.json"), "--finetune", str(tmp_path / "small.pth"),
            *COMMON, "--save-every", "1"]
    proc = launch(args, None, ranks=0, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert "small.pth: loaded" in text
    assert "non-finite loss" in text and "--nan-policy skip" in text
    latest = (out / "checkpoints" / "latest").read_text()
    assert f"Last good checkpoint: {latest}" in text
    assert not (out / "weights.pth").exists()

    # skip, in bf16 (DeepSpeed's bf16 on CPU; buffers follow the parameters' dtype)
    bf16 = json.loads((REPO / "ds_configs" / "cpu.json").read_text()) | {"bf16": {"enabled": True}}
    (tmp_path / "bf16.json").write_text(json.dumps(bf16))
    out = tmp_path / "skip"
    proc = launch([*args[:3], str(out), *args[4:], "--deepspeed_config", str(tmp_path / "bf16.json"),
                   "--nan-policy", "skip", "--max-steps", "12"], None, ranks=0)
    text = proc.stdout + proc.stderr
    assert text.count("skipping a micro batch with non-finite loss") >= 1
    state = torch.load(out / "checkpoints" / "step00000012" / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)
    weights = {k: v for k, v in state["module"].items() if v.is_floating_point()}
    assert weights["pos_embed"].dtype == torch.bfloat16 and weights["patch_embed.bn1.running_var"].dtype == torch.bfloat16
    assert all(torch.isfinite(v).all() for v in weights.values())
