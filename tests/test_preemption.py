"""Preemption: a signal stops every rank at the same step with a checkpoint, ``--resume auto``
finishes the run. Real ``deepspeed`` launcher, two CPU ranks over gloo, a real MLflow store.

Six launches: SIGTERM to the launcher (fresh start under ``--resume auto``, a loader
worker per rank); SIGUSR1 to one rank only, then ``--resume auto`` to the end; SIGTERM to
the ``deepspeed`` command alone, then ``--resume auto`` to the end; one process whose grace
period is too short for the checkpoint being written. The figures the tests measure (steps run after the signal, seconds from the
signal to the saved checkpoint) are printed (``pytest -s``) for docs/training.md.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from test_train import COMMON, REPO, command, ds_config, write_shards

from lvvit.loader.pipeline import train_loader
from lvvit.train.build import train_seed
from lvvit.train.preemption import PREEMPTED_EXIT
from lvvit.train.sample_log import read_sample_log
from lvvit.train.schedule import WarmupCosineSchedule

pytestmark = pytest.mark.slow

# 192 samples, micro batch 8 x 2 ranks: 12 steps/epoch; 1 cosine epoch + 1 cooldown = 24 steps
EPOCHS = ["--epochs", "1", "--cooldown-epochs", "1", "--no-eval"]
TOTAL_STEPS = 24
LAUNCHER_KILLS_AFTER = 30.0  # deepspeed.launcher.launch: SIGTERM to the ranks, SIGKILL 30 s later
STEP_LINE = re.compile(r"lvvit\.train INFO step (\d+) loss")
PREEMPTED_LINE = re.compile(r"preempted: (.*?); stopped at step (\d+), checkpoint (step\d{8}) saved in "
                            r"([\d.]+) s; exiting with (\d+)")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("preempt") / "train", 192, 96, tlm=False, seed=5)


def args_for(out: Path, shards: Path, cfg: Path, *extra: str) -> list[str]:
    return ["--deepspeed_config", str(cfg), "--train-shards", f"{shards}/data-{{000000..000001}}.tar",
            "--output", str(out), "--experiment", "lvvit-preempt", *COMMON, *EPOCHS, *extra]


class Run:
    """A two-rank launch (``ranks=0``: ``python train.py``) whose output is followed in a file."""

    def __init__(self, args: list[str], uri: str | None, log: Path, ranks: int = 2) -> None:
        cmd, env = command(args, uri, ranks)
        self.log = log
        self.sink = log.open("w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.sink, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, ready, what: str, timeout: float = 300, every: float = 0.01) -> None:
        deadline = time.time() + timeout
        while not ready():
            assert self.proc.poll() is None, f"run ended before {what}:\n{self.text()[-4000:]}"
            assert time.time() < deadline, f"no {what} after {timeout} s:\n{self.text()[-4000:]}"
            time.sleep(every)

    def last_step(self) -> int:
        steps = [int(s) for s in STEP_LINE.findall(self.text())]
        return steps[-1] if steps else 0

    def launcher(self) -> psutil.Process:
        """The per-node ``deepspeed.launcher.launch`` that the ``deepspeed`` runner started."""
        return next(p for p in psutil.Process(self.proc.pid).children(recursive=True)
                    if "deepspeed.launcher.launch" in " ".join(p.cmdline()))

    def rank(self, local_rank: int) -> psutil.Process:
        return next(p for p in self.launcher().children()
                    if f"--local_rank={local_rank}" in p.cmdline())

    def finish(self, timeout: float = 120) -> tuple[int, float]:
        """The runner's exit status and when it ended; nothing of the group is left."""
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            ended = time.time()
            self.sink.close()
        for _ in range(200):
            if not any(str(self.log.parent) in " ".join(p.info["cmdline"] or [])
                       for p in psutil.process_iter(["cmdline"])):
                return code, ended
            time.sleep(0.05)
        raise AssertionError("processes of the run survived it")


def signal_mid_epoch(run: Run, send, after_step: int = 5) -> tuple[int, float]:
    """``send()`` once rank 0 has logged ``after_step``: the step logged last, and when."""
    run.wait_for(lambda: run.last_step() >= after_step, f"step {after_step}")
    step = run.last_step()
    sent = time.time()
    send()
    return step, sent


def preempted_lines(text: str) -> list[tuple[str, int, str, float, int]]:
    return [(got, int(step), tag, float(took), int(code)) for got, step, tag, took, code in
            PREEMPTED_LINE.findall(text)]


def tag_state(tag_dir: Path) -> dict:
    return torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)


def assert_stopped_at(out: Path, signalled_step: int) -> int:
    """``latest`` names a complete checkpoint one to three steps after the signal (the ranks
    agree at the boundary after the one where the flag was seen); returns its step."""
    ckpts = out / "checkpoints"
    tag = (ckpts / "latest").read_text()
    step = int(tag.removeprefix("step"))
    assert signalled_step < step <= signalled_step + 3, (signalled_step, tag)
    assert {f"lvvit_rng_rank{r}.pt" for r in (0, 1)} <= {p.name for p in (ckpts / tag).iterdir()}
    state = tag_state(ckpts / tag)
    assert state["global_steps"] == step and state["lvvit"]["step_in_epoch"] == step  # epoch 0
    return step


def report(what: str, signalled: int, stopped: int, sent: float, ended: float, lines: list) -> None:
    took = max(float(m.group(1)) for got, *_ in lines if (m := re.search(r"([\d.]+) s ago", got)))
    print(f"\n[figures] {what}: signal after step {signalled}, checkpoint at step {stopped} "
          f"({stopped - signalled} step(s) later), saved {took:.2f} s after the signal; "
          f"{ended - sent:.1f} s from the signal to the launcher's exit")


def test_sigterm_to_the_launcher_checkpoints_at_the_next_step(shards, tmp_path):
    """SIGTERM to ``deepspeed.launcher.launch``, which passes it to rank 0 and its loader
    worker and, once they have exited (or after 30 s, with SIGKILL), to rank 1: both ranks
    stop at the same step, save it, close MLflow as KILLED, well inside the 30 s; the loader
    worker outlives the signal. ``--resume auto`` found nothing: a fresh start."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "term"
    run = Run(args_for(out, shards, ds_config(tmp_path, 2), "--resume", "auto", "--save-every", "100",
                       "--workers", "1"), uri, tmp_path / "term.log")
    signalled, sent = signal_mid_epoch(run, lambda: run.launcher().send_signal(signal.SIGTERM))
    code, ended = run.finish()
    text = run.text()
    assert ended - sent < LAUNCHER_KILLS_AFTER, text[-3000:]
    assert "--resume auto: no checkpoint in" in text and "starting fresh" in text
    assert code == 1, text[-3000:]  # the launcher's own status when it is signalled (docs/training.md)
    lines = preempted_lines(text)
    assert len(lines) == 2, text[-3000:]  # one per rank, the same step and tag, each exiting 75
    stopped = assert_stopped_at(out, signalled)
    assert {(step, tag, code) for _, step, tag, _, code in lines} == {(stopped, f"step{stopped:08d}", PREEMPTED_EXIT)}
    # the launcher signals rank 0 and waits for it to exit before it signals rank 1
    assert sorted(got.split(" ")[0] for got, *_ in lines) == ["SIGTERM", "no"], lines
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    assert MlflowClient(uri).get_run(run_id).info.status == "KILLED"
    report("SIGTERM to the launcher", signalled, stopped, sent, ended, lines)


def test_sigusr1_to_one_rank_stops_both_and_resume_auto_finishes(shards, tmp_path):
    """SIGUSR1 to rank 1 alone: both ranks stop at the same step (rank 0 had no signal), the
    ranks exit 75 and the launcher passes that on. ``--resume auto`` then trains every step
    of the schedule exactly once (none lost, none repeated) and closes the same MLflow run.

    Exact resume (``--sampling epoch``, 2 loader workers per rank): the step -> sample keys
    logs of the interrupted-and-resumed run equal an uninterrupted run's on both ranks, each
    epoch covers every sample exactly once, and the final weights are equal."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "usr1"
    exact = ["--sampling", "epoch", "--workers", "2"]
    args = args_for(out, shards, ds_config(tmp_path, 2), "--resume", "auto", "--save-every", "4", *exact,
                    "--sample-log", str(out / "samples"))
    run = Run(args, uri, tmp_path / "usr1.log")
    signalled, sent = signal_mid_epoch(run, lambda: run.rank(1).send_signal(signal.SIGUSR1), after_step=6)
    code, ended = run.finish()
    text = run.text()
    assert code == PREEMPTED_EXIT, text[-3000:]
    assert ended - sent < 60.0  # --preempt-grace default
    lines = preempted_lines(text)
    assert sorted(got.split(" ")[0] for got, *_ in lines) == ["SIGUSR1", "no"], lines
    stopped = assert_stopped_at(out, signalled)
    assert {step for _, step, *_ in lines} == {stopped}
    client = MlflowClient(uri)
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"
    report("SIGUSR1 to one rank", signalled, stopped, sent, ended, lines)

    cmd, env = command(args, uri)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-4000:]
    assert f"--resume auto: resuming from {out / 'checkpoints' / 'latest'}" in text
    assert f"resumed at step {stopped} (epoch 0, step {stopped} in it)" in text
    assert json.loads((out / "mlflow_run.json").read_text())["run_id"] == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    lrs = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/lr"))
    assert [s for s, _ in lrs] == list(range(1, TOTAL_STEPS + 1))  # each step once: nothing lost
    schedule = WarmupCosineSchedule(lr=3e-3, min_lr=1e-4, warmup_lr=1e-6, warmup_epochs=0.5, epochs=1,
                                    steps_per_epoch=12)
    assert [v for _, v in lrs] == pytest.approx([schedule.lr_at(s) for s, _ in lrs], rel=1e-9)
    final = tag_state(out / "checkpoints" / f"step{TOTAL_STEPS:08d}")
    assert final["global_steps"] == TOTAL_STEPS and final["lvvit"]["epoch"] == 2
    assert (out / "weights.pth").is_file()

    whole = tmp_path / "whole"
    cmd, env = command(args_for(whole, shards, ds_config(tmp_path, 2), "--no-mlflow", *exact,
                                "--sample-log", str(whole / "samples")), None)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    logs = [read_sample_log(out / "samples" / f"rank{r}.jsonl") for r in (0, 1)]
    assert logs == [read_sample_log(whole / "samples" / f"rank{r}.jsonl") for r in (0, 1)]
    assert all(sorted(log) == list(range(1, TOTAL_STEPS + 1)) for log in logs)
    for epoch in range(2):  # 192 samples = 12 steps x 2 ranks x 8: every one once, none left out
        keys = [k for log in logs for step in range(12 * epoch + 1, 12 * epoch + 13) for k in log[step]]
        assert len(keys) == len(set(keys)) == 192
    resumed, uninterrupted = (torch.load(d / "weights.pth", map_location="cpu", weights_only=True)
                              for d in (out, whole))
    for part in ("state_dict", "state_dict_ema"):
        assert resumed[part].keys() == uninterrupted[part].keys() and len(resumed[part]) > 10
        assert all(torch.equal(resumed[part][k], uninterrupted[part][k]) for k in resumed[part]), part


def processes_of(run: Run) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if str(run.log.parent) in " ".join(p.info["cmdline"] or [])]


def test_sigterm_to_the_deepspeed_command_checkpoints_and_resume_auto_finishes(shards, tmp_path):
    """SIGTERM to the ``deepspeed`` command alone (the runner; what a container's init or a
    terminal sends): it ends at once and passes nothing on, but both ranks see it gone, stop
    at the same step with a checkpoint and exit 75, and the launcher with them. Before, the
    ranks trained on, unaware, and saved nothing. ``--resume auto`` then trains to the end."""
    out = tmp_path / "runner"
    args = args_for(out, shards, ds_config(tmp_path, 2), "--no-mlflow", "--resume", "auto", "--save-every", "100",
                    "--workers", "1")
    run = Run(args, None, tmp_path / "runner.log")
    runner = run.proc.pid
    signalled, sent = signal_mid_epoch(run, lambda: run.proc.send_signal(signal.SIGTERM), after_step=1)
    assert run.proc.wait(timeout=10) == -signal.SIGTERM  # the runner has no handler on one node
    deadline = sent + 60
    while processes_of(run):  # the launcher and the ranks end by themselves
        assert time.time() < deadline, f"the ranks outlived the runner:\n{run.text()[-3000:]}"
        time.sleep(0.05)
    ended = time.time()
    run.sink.close()
    text = run.text()
    assert text.count(f"the deepspeed runner (pid {runner}) has ended: stopping the run as on SIGTERM") == 2
    lines = preempted_lines(text)
    assert len(lines) == 2, text[-3000:]
    tag = (out / "checkpoints" / "latest").read_text()
    stopped = int(tag.removeprefix("step"))
    assert signalled < stopped <= 12, text[-3000:]  # at the latest at the end of the epoch, where they agree
    assert {(step, t, code) for _, step, t, _, code in lines} == {(stopped, tag, PREEMPTED_EXIT)}
    report("SIGTERM to the deepspeed runner", signalled, stopped, sent, ended, lines)

    cmd, env = command(args, None)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-4000:]
    assert f"resumed at step {stopped} (epoch 0, step {stopped} in it)" in text
    assert tag_state(out / "checkpoints" / f"step{TOTAL_STEPS:08d}")["global_steps"] == TOTAL_STEPS
    assert (out / "weights.pth").is_file()


def test_grace_too_short_for_the_write_keeps_the_previous_latest(shards, tmp_path):
    """One process (``python train.py``), SIGTERM while step 4 is being written (its folder
    is there), with a grace period (1 ms) that ends before the write can: the process ends
    by SIGALRM and ``latest`` names a complete checkpoint (step 2; step 4 only if its write
    won the race), never a half-written one."""
    out = tmp_path / "short"
    ckpts = out / "checkpoints"
    run = Run(args_for(out, shards, ds_config(tmp_path, 2), "--no-mlflow", "--save-every", "2",
                       "--preempt-grace", "0.001", "--grad-accum", "2"), None, tmp_path / "short.log", ranks=0)
    run.wait_for((ckpts / "step00000004").exists, "step00000004", every=0.0005)
    run.proc.send_signal(signal.SIGTERM)
    code, _ = run.finish()
    text = run.text()
    assert code == -signal.SIGALRM and not preempted_lines(text), text[-3000:]
    latest = (ckpts / "latest").read_text()
    assert latest in ("step00000002", "step00000004"), latest
    expected = {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "lvvit_rng_rank0.pt"}
    assert expected <= {p.name for p in (ckpts / latest).iterdir()}
    for name in expected:
        torch.load(ckpts / latest / name, map_location="cpu", weights_only=False)
    assert not (ckpts / "step00000006").exists()  # nothing trained past the deadline was saved


def test_resumed_epoch_is_reseeded_never_replayed(shards):
    """After a resume at step k of an epoch the stream is drawn with another seed, so the
    resumed run does not train on the sample order the preempted segment already did
    (compared by the 40 labels of 5 batches; the same seed gives the same labels)."""
    def labels(seed: int) -> list[int]:
        loader = train_loader(shards, batch_size=8, img_size=32, num_workers=0, world_size=1, randaugment=None,
                              erase_prob=0.0, steps_per_epoch=5, seed=seed)
        return [int(x) for b in loader for x in b["labels"]]

    seeds = {train_seed(42, epoch, skip) for epoch in range(3) for skip in range(12)}
    assert len(seeds) == 36  # every (epoch, resume point) its own stream
    before = labels(train_seed(42, 0, 0))  # what a run preempted after step 5 trained on
    assert labels(train_seed(42, 0, 0)) == before
    assert labels(train_seed(42, 0, 5)) != before  # what the run resumed at step 5 trains on


@pytest.mark.parametrize(("flags", "message"), [
    (["--preempt-signals", "SIGTERM,KILL"], "--preempt-signals: 'KILL' cannot be used"),
    (["--preempt-signals", "TERM,NOPE"], "--preempt-signals: 'NOPE' is not a signal name"),
    (["--preempt-grace", "0"], "--preempt-grace 0.0: must be > 0"),
])
def test_preemption_options_are_checked(flags, message, capsys):
    from lvvit.train.cli import parse_config

    with pytest.raises(SystemExit) as exit_:
        parse_config(["--train-shards", "x", *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    config = parse_config(["--train-shards", "x", "--preempt-signals", "usr1,TERM"])
    assert config.preemption.signals == (signal.SIGUSR1, signal.SIGTERM)
