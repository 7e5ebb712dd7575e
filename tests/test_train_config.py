"""Options, batch/lr resolution, the schedule and the no-decay set: no processes started."""

from __future__ import annotations

import math

import pytest

from lvvit.models import create_model
from lvvit.train.config import parse_args, peak_lr, resolve_batch, resolve_ds_config
from lvvit.train.loop import param_groups
from lvvit.train.schedule import WarmupCosineSchedule


def test_yaml_under_command_line(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: lvvit_l\nepochs: 30\nweight-decay: 1.0e-8\nmodel_arg: [depth=2]\n")
    args = parse_args(["--config", str(cfg), "--train-shards", "x", "--epochs", "7"])
    assert (args.model, args.epochs, args.weight_decay) == ("lvvit_l", 7, 1e-8)
    assert args.model_overrides == {"depth": 2}
    assert args.cooldown_epochs == 10 and args.ema_decay == 0.99992 and args.min_lr == 1e-5  # recipe


def test_yaml_unknown_key_names_it(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("epochz: 3\n")
    with pytest.raises(SystemExit, match="unknown option 'epochz'"):
        parse_args(["--config", str(cfg), "--train-shards", "x"])


def test_batch_sources_and_lr_scaling():
    args = parse_args(["--train-shards", "x", "--model", "lvvit_l"])
    plan = resolve_batch(args, {"train_micro_batch_size_per_gpu": 64, "gradient_accumulation_steps": 2}, 8)
    assert (plan.global_batch, plan.sources["micro_batch"]) == (1024, "deepspeed config")
    assert peak_lr(args, plan.global_batch) == pytest.approx(1e-3)  # L's base rate at 1024
    args = parse_args(["--train-shards", "x", "--micro-batch", "32"])
    plan = resolve_batch(args, {"train_batch_size": 512}, 4)
    assert (plan.micro_batch, plan.grad_accum) == (32, 4)
    assert plan.sources == {"micro_batch": "command line", "grad_accum": "deepspeed config train_batch_size"}
    assert peak_lr(args, plan.global_batch) == pytest.approx(1.6e-3 * 512 / 1024)
    ds = resolve_ds_config(args, {"optimizer": {"type": "AdamW", "params": {"torch_adam": True}},
                                  "scheduler": {"type": "WarmupLR"}}, plan, 8e-4)
    assert ds["train_batch_size"] == 512 and ds["optimizer"]["params"] == {
        "torch_adam": True, "lr": 8e-4, "weight_decay": 0.05}
    assert "scheduler" not in ds


def test_schedule_matches_official_curve():
    s = WarmupCosineSchedule(lr=1e-3, min_lr=1e-5, warmup_lr=1e-6, warmup_epochs=5, epochs=300,
                             steps_per_epoch=100)
    assert s.lr_at(0) == pytest.approx(1e-6)
    assert s.lr_at(250) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 2.5 / 5)
    # after warmup the cosine clock is the epoch itself (timm, warmup_prefix=False)
    assert s.lr_at(500) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 5 / 300)))
    assert s.lr_at(15000) == pytest.approx((1e-3 + 1e-5) / 2)
    assert s.lr_at(30000) == s.lr_at(30999) == 1e-5  # cooldown
    assert s(250) == pytest.approx(s.lr_at(250) / 1e-3)


def test_no_weight_decay_set():
    model = create_model("lvvit_t", img_size=64, num_classes=10, embed_dim=48, depth=2, num_heads=2,
                         stem_width=16)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed", "cls_token", "head.bias", "blocks.0.norm1.weight", "patch_embed.bn1.weight"} <= no_decay_names
    assert {names[id(p)] for p in decay["params"]} == {
        n for n, p in model.named_parameters() if p.ndim > 1 and n not in ("pos_embed", "cls_token")}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)


@pytest.mark.parametrize(("extra", "message"), [
    (["--finetune", "w.pth"], "--eval-only needs --eval-shards"),
    (["--eval-shards", "v"], "exactly one of --resume"),
    (["--eval-shards", "v", "--finetune", "w.pth", "--resume"], "exactly one of --resume"),
    (["--eval-shards", "v", "--finetune", "w.pth", "--no-eval"], "contradicts --no-eval"),
])
def test_eval_only_needs_shards_and_one_source(extra, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--eval-only", *extra])
    assert message in capsys.readouterr().err


def test_eval_only_needs_no_train_shards():
    args = parse_args(["--eval-only", "--eval-shards", "v", "--resume", "step00000008"])
    assert args.eval_only and args.resume == "step00000008" and args.train_shards is None
    with pytest.raises(SystemExit):
        parse_args(["--eval-shards", "v"])  # training still needs them
