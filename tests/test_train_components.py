"""The trainer's components on their own, with small fakes and no DeepSpeed engine: the save
policy and rotation, the training state's round trip and global-batch check, the metrics'
names and log line, ``--nan-policy``'s decisions, and the validator.

The collectives (barriers, all-reduces) run in a real one-rank gloo process group."""

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lvvit.errors import ConfigError
from lvvit.ports import free_port
from lvvit.train.checkpointing import Checkpointer, SavePolicy, step_tag
from lvvit.train.ema import ModelEma
from lvvit.train.metrics import NonFinitePolicy, StepMetrics, StepTotals, log_line
from lvvit.train.state import GlobalBatchMismatch, Stateful, TrainState
from lvvit.train.step import STEP_STATS
from lvvit.train.validate import Validator


@pytest.fixture(scope="module", autouse=True)
def process_group():
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class FakeEngine:
    """DeepSpeed's checkpoint protocol over a dict: the client state in one data file per tag."""

    def __init__(self) -> None:
        self.global_steps = 0
        self.module = torch.nn.BatchNorm1d(3)  # floating-point buffers: each rank saves its own

    def save_checkpoint(self, directory: str, tag: str, client_state: dict, save_latest: bool) -> None:
        assert not save_latest  # ``latest`` is the Checkpointer's
        (Path(directory) / tag).mkdir(parents=True, exist_ok=True)
        torch.save({**client_state, "global_steps": self.global_steps},
                   Path(directory) / tag / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, directory: str, tag: str) -> tuple[str, dict]:
        path = Path(directory) / tag / "mp_rank_00_model_states.pt"
        state = torch.load(path, weights_only=True)
        self.global_steps = state["global_steps"]
        return str(path), state

    def load_universal_checkpoint(self) -> bool:
        return False


def checkpointer(directory: Path, global_batch: int | None, keep: int = 2) -> Checkpointer:
    return Checkpointer(FakeEngine(), directory, keep, None, TrainState(global_batch), SavePolicy(0, None))


def test_save_policy_saves_every_n_steps_and_at_max_steps():
    policy = SavePolicy(every=3, max_steps=7)
    assert [s for s in range(1, 10) if policy.due(s, epoch_done=False)] == [3, 6, 7, 8, 9]
    assert not policy.due(6, epoch_done=True)  # the epoch end saves anyway
    assert [s for s in range(1, 10) if policy.stops(s)] == [7, 8, 9]
    assert [s for s in range(1, 10) if SavePolicy(0, None).due(s, False)] == []


def test_checkpointer_rotates_and_round_trips_the_state(tmp_path):
    saver = checkpointer(tmp_path, 16, keep=2)
    saver.engine.module.running_mean.fill_(7.0)  # this rank's own statistics
    for step in (1, 2, 3):
        saver.engine.global_steps = step
        if saver.state.advance(step, steps_per_epoch=2):
            saver.state.next_epoch()
        saver.save({"mlflow_run_id": "run-1"})
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [step_tag(2), step_tag(3)]
    assert (tmp_path / "latest").read_text() == step_tag(3) and saver.saved_current()

    resumed = checkpointer(tmp_path, 16)
    ours = resumed.resume("latest")
    assert ours["mlflow_run_id"] == "run-1"
    assert resumed.state == TrainState(global_batch=16, step=3, epoch=1, step_in_epoch=1) == saver.state
    assert resumed.last_tag == step_tag(3) and resumed.loaded_from == tmp_path / step_tag(3)
    assert torch.equal(resumed.engine.module.running_mean, torch.full((3,), 7.0))


def test_resume_refuses_another_global_batch_naming_both(tmp_path):
    saver = checkpointer(tmp_path, 16)
    saver.engine.global_steps = 5
    saver.save({})
    other = checkpointer(tmp_path, 32)
    with pytest.raises(ConfigError) as err:
        other.resume("latest")
    message = str(err.value)
    assert "global batch 16" in message and "this run's is 32" in message and step_tag(5) in message
    assert "\n" not in message and other.state == TrainState(32)
    assert checkpointer(tmp_path, None).resume("latest") is not None  # --eval-only takes any


def test_train_state_is_stateful_and_accepts_older_checkpoints():
    state = TrainState(global_batch=64, step=10, epoch=2, step_in_epoch=3)
    assert isinstance(state, Stateful)
    copy = TrainState(64)
    copy.load_state_dict(state.state_dict())
    assert copy == state
    older = TrainState(64)
    older.load_state_dict({"epoch": 1, "step_in_epoch": 4})  # saved before global_batch was recorded
    assert (older.epoch, older.step_in_epoch) == (1, 4)
    with pytest.raises(GlobalBatchMismatch):
        TrainState(32).load_state_dict(state.state_dict())


def test_metrics_names_throughput_data_wait_and_log_line():
    metrics = StepMetrics(torch.device("cpu"), log_every=2, global_batch=16)
    for loss in (1.0, 2.0):
        metrics.add(torch.tensor([loss, loss / 2, loss / 4, 1.0, 0.0], dtype=torch.float64))
    totals = metrics.read()
    assert totals.steps == 2 and totals.stats == {"loss": 3.0, "cls_loss": 1.5, "aux_loss": 0.75,
                                                  "finite_micro_batches": 2.0, "non_finite_micro_batches": 0.0}
    assert metrics.steps == 0 and metrics.sums.sum().item() == 0  # read resets
    fed = StepTotals(dict(zip(STEP_STATS, (3.0, 1.5, 0.75, 2.0, 0.0), strict=True)), steps=2, step_time=0.5,
                     data_wait=0.25)
    named = metrics.named(fed, lr=1e-3, grad_norm=2.5, epoch=0.5, skipped=1)
    assert named == {"train/loss": 1.5, "train/cls_loss": 0.75, "train/aux_loss": 0.375, "train/lr": 1e-3,
                     "train/step_time": 0.5, "train/images_per_sec": 32.0, "train/data_wait_share": 0.25,
                     "train/epoch": 0.5, "train/skipped_micro_batches": 1.0, "train/grad_norm": 2.5}
    assert log_line(4, named) == "step 4 loss 1.5000 lr 0.001 32.0 img/s"


def test_metrics_count_the_wait_for_data():
    metrics = StepMetrics(torch.device("cpu"), log_every=1, global_batch=1)

    def slow():
        for i in range(3):
            time.sleep(0.02)
            yield i

    assert list(metrics.waited_on(slow())) == [0, 1, 2]
    assert metrics.data_wait >= 0.06
    metrics.add(torch.zeros(len(STEP_STATS), dtype=torch.float64))
    assert metrics.read().data_wait >= 0.06 and metrics.data_wait == 0.0


def test_non_finite_policy_skips_or_names_the_steps_to_stop_at():
    skip = NonFinitePolicy("skip")
    assert skip.check(0, 1, 4) is None and skip.skipped == 0
    assert skip.check(2, 1, 4) is None and skip.check(1, 5, 8) is None and skip.skipped == 3
    stop = NonFinitePolicy("stop")
    assert stop.check(0, 1, 4) is None
    assert stop.check(2, 5, 8) == "2 micro batch(es) of steps 5..8" and stop.skipped == 2


class Fixed(nn.Module):
    """Logits that ignore the image: class scores ``self.scores`` for every sample."""

    def __init__(self, scores: list[float]) -> None:
        super().__init__()
        self.scores = nn.Parameter(torch.tensor(scores))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.scores.expand(images.shape[0], -1) + 0 * images.mean()


def test_validator_evaluates_weights_and_ema():
    model = Fixed([1.0, 0.0, 0.0])
    ema = ModelEma(model, decay=0.5)
    ema.load_full_state_dict({"scores": torch.tensor([0.0, 1.0, 0.0])})
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    batches = [{"images": images, "labels": torch.tensor([0, 0, 1, 2])},
               {"images": images, "labels": torch.tensor([1, 1, 0, 0]),
                "valid": torch.tensor([True, True, False, False])}]  # the padded tail counts 2
    metrics = Validator(model, ema, lambda: iter(batches), torch.device("cpu"), torch.float32)()
    assert metrics["eval/samples"] == metrics["eval_ema/samples"] == 6
    assert metrics["eval/top1"] == pytest.approx(100 * 2 / 6)  # class 0 is right for 2 of 6
    assert metrics["eval_ema/top1"] == pytest.approx(100 * 3 / 6)  # class 1 for 3 of 6
    assert metrics["eval/top5"] == 100.0 and model.scores.tolist() == [1.0, 0.0, 0.0]  # weights back
    assert model.training  # mode restored

