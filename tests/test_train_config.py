"""Options, batch/lr resolution, the schedule and the no-decay set: no processes started."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from lvvit.errors import ConfigError, DataError
from lvvit.models import create_model
from lvvit.train.cli import build_parser, parse_config
from lvvit.train.config import (
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrackingConfig,
    TrainConfig,
    open_source,
    peak_lr,
    prepare,
    resolve_batch,
    resolve_ds_config,
)
from lvvit.train.ds_config import deepspeed_schema, load_ds_config
from lvvit.train.engine import param_groups
from lvvit.train.options import RANGES, numeric_actions
from lvvit.train.schedule import WarmupCosineSchedule


def test_yaml_under_command_line(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: lvvit_l\nepochs: 30\nweight-decay: 1.0e-8\nmodel_arg: [depth=2]\n")
    config = parse_config(["--config", str(cfg), "--train-shards", "x", "--epochs", "7"])
    assert (config.model.name, config.schedule.epochs, config.optim.weight_decay) == ("lvvit_l", 7, 1e-8)
    assert config.model.overrides == {"depth": 2} and config.config_file == cfg
    assert config.schedule.cooldown_epochs == 10 and config.optim.ema_decay == 0.99992  # recipe
    assert config.optim.min_lr == 1e-5
    options = config.options()  # the MLflow params: option names as typed
    assert (options["model"], options["epochs"], options["model_arg"], options["preempt_signals"]) == (
        "lvvit_l", 7, {"depth": 2}, "SIGTERM,SIGUSR1")


def test_typed_config_checks_combinations_without_a_command_line():
    with pytest.raises(ConfigError, match="--train-shards is required"):
        TrainConfig()
    assert TrainConfig(data=DataConfig(train_shards="x")).schedule.total_epochs == 310


def refusal(argv: list[str], capsys) -> str:
    """The one line ``parse_config`` exits 2 with."""
    with pytest.raises(SystemExit) as e:
        parse_config(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("train.py: error: "), err
    return err.strip()


def test_yaml_unknown_key_names_it(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("epochz: 3\n")
    assert refusal(["--config", str(cfg), "--train-shards", "x"], capsys).endswith(
        "unknown option 'epochz' (did you mean 'epochs'?)")


@pytest.mark.parametrize(("flags", "message"), [
    (["--keep", "0"], "--keep 0: must be >= 1"),
    (["--keep", "-2"], "--keep -2: must be >= 1"),
    (["--ema-decay", "2"], "--ema-decay 2.0: must be in [0, 1)"),
    (["--warmup-epochs", "-1"], "--warmup-epochs -1.0: must be >= 0"),
    (["--shard-timeout", "-1"], "--shard-timeout -1.0: must be > 0"),
    (["--lr", "inf"], "--lr inf: must be a finite number"),
    (["--lr", "nan"], "--lr nan: must be a finite number"),
    (["--log-every", "0"], "--log-every 0: must be >= 1"),
    (["--scale", "0.9", "0.1"], "--scale 0.9 0.1: must be MIN <= MAX"),
])
def test_out_of_range_options_are_refused_before_compute(flags, message, capsys):
    assert refusal(["--train-shards", "x", *flags], capsys) == f"train.py: error: {message}"


@pytest.mark.parametrize(("text", "message"), [
    ("lr: .inf\n", "lr: inf must be a finite number"),
    ("lr: .nan\n", "lr: nan must be a finite number"),
    ("keep: 0\n", "keep: 0 must be >= 1"),
    ("epochs: 2.5\n", "epochs: 2.5 is not an integer"),
    ("epochs: 3\nlr: 1.0e-3\nepochs: 5\n", "key 'epochs' appears twice (line 3)"),
    ("model-arg: " + "[" * 10000 + "]" * 10000 + "\n", "nested deeper than 32 levels"),
    ("model-arg: [depth=1]\n" + "a: {" * 5000 + "}" * 5000 + "\n", "nested deeper than 32 levels"),
])
def test_config_file_values_are_checked_as_data(text, message, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    line = refusal(["--config", str(cfg), "--train-shards", "x"], capsys)
    assert line.startswith(f"train.py: error: --config {cfg}: ") and message in line


def test_every_numeric_option_has_a_range():
    assert set(numeric_actions(build_parser())) == set(RANGES)
    c = parse_config(["--train-shards", "x", "--lr", "1e-3", "--warmup-epochs", "0", "--ema-decay", "0"])
    assert (c.optim.lr, c.schedule.warmup_epochs, c.optim.ema_decay, c.checkpoint.keep) == (1e-3, 0.0, 0.0, 3)


def test_batch_sources_and_lr_scaling():
    plan = resolve_batch(OptimConfig(), {"train_micro_batch_size_per_gpu": 64, "gradient_accumulation_steps": 2}, 8)
    assert (plan.global_batch, plan.sources["micro_batch"]) == (1024, "deepspeed config")
    assert peak_lr("lvvit_l", OptimConfig(), plan.global_batch) == pytest.approx(1e-3)  # L's base rate at 1024
    config = parse_config(["--train-shards", "x", "--micro-batch", "32"])
    plan = resolve_batch(config.optim, {"train_batch_size": 512}, 4)
    assert (plan.micro_batch, plan.grad_accum) == (32, 4)
    assert plan.sources == {"micro_batch": "command line", "grad_accum": "deepspeed config train_batch_size"}
    assert peak_lr(config.model.name, config.optim, plan.global_batch) == pytest.approx(1.6e-3 * 512 / 1024)
    ds = resolve_ds_config(config, {"optimizer": {"type": "AdamW", "params": {"torch_adam": True}},
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
        parse_config(["--eval-only", *extra])
    assert message in capsys.readouterr().err
    with pytest.raises(ConfigError, match=re.escape(message)):  # the same check without a command line
        TrainConfig(data=DataConfig(eval_shards="v" if "--eval-shards" in extra else None),
                    tracking=TrackingConfig(eval_only=True, eval="--no-eval" not in extra),
                    checkpoint=CheckpointConfig(resume="latest" if "--resume" in extra else None),
                    model=ModelConfig(finetune=Path("w.pth") if "--finetune" in extra else None))


def test_eval_only_needs_no_train_shards():
    c = parse_config(["--eval-only", "--eval-shards", "v", "--resume", "step00000008"])
    assert c.tracking.eval_only and c.checkpoint.resume == "step00000008" and c.data.train_shards is None
    with pytest.raises(SystemExit):
        parse_config(["--eval-shards", "v"])  # training still needs them


REPO_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "ds_configs").glob("*.json"))


@pytest.mark.parametrize("path", REPO_CONFIGS, ids=lambda p: p.name)
def test_shipped_deepspeed_configs_pass(path):
    assert load_ds_config(path) == json.loads(path.read_text())


def test_known_keys_come_from_deepspeed():
    schema = deepspeed_schema()
    # recorded from DeepSpeed's parser, not listed by us
    assert {"train_batch_size", "gradient_clipping", "flops_profiler", "autotuning", "steps_per_print"} <= set(schema)
    # pydantic field names and their aliases, nested offload models included
    zero = schema["zero_optimization"]
    assert {"stage", "prefetch_bucket_size", "stage3_prefetch_bucket_size"} <= set(zero)
    assert "pin_memory" in zero["offload_optimizer"]
    assert "zero_optimisation" not in schema


@pytest.mark.parametrize(("cfg", "message"), [
    ({"zero_optimisation": {"stage": 2}}, "unknown key 'zero_optimisation' (did you mean 'zero_optimization'?)"),
    ({"zero_optimization": {"stage": 2, "overlap_com": True}},
     "unknown key 'zero_optimization.overlap_com' (did you mean 'zero_optimization.overlap_comm'?)"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memry": True}}},
     "unknown key 'zero_optimization.offload_optimizer.pin_memry' (did you mean "
     "'zero_optimization.offload_optimizer.pin_memory'?)"),
    ({"optimizer": {"type": "AdamW", "params": {"torch_adam": True, "beta": [0.9, 0.99]}}},
     "unknown key 'optimizer.params.beta' (did you mean 'optimizer.params.betas'?)"),
    ({"optimizer": {"type": "AdamW", "parms": {}}}, "unknown key 'optimizer.parms' (did you mean 'optimizer.params'?)"),
    ({"fp16": {"enabled": True, "loss_scal": 0}}, "unknown key 'fp16.loss_scal' (did you mean 'fp16.loss_scale'?)"),
    ({"bf16": {"enabeld": True}}, "unknown key 'bf16.enabeld' (did you mean 'bf16.enabled'?)"),
    ({"data_types": {"bufer_dtype": "bf16"}}, "unknown key 'data_types.bufer_dtype'"),
    ({"zero_optimization": {"stage": 7}}, "zero_optimization.stage: Input should be"),
    ({"zero_optimization": True}, "'zero_optimization' must be a JSON object"),
    ({"gradient_clipping": -1.0}, "gradient_clipping -1.0 is not a number >= 0"),
    ({"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}, "bf16 needs zero_optimization.stage >= 1"),
])
def test_deepspeed_config_refused_naming_the_key(cfg, message, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        load_ds_config(path)
    text = str(e.value)
    assert text.startswith(f"--deepspeed_config {path}: ") and message in text and "\n" not in text


def test_deepspeed_config_duplicate_key_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 2}, "zero_optimization": {"stage": 0}}')
    with pytest.raises(ConfigError, match="key 'zero_optimization' appears twice"):
        load_ds_config(path)


def test_clip_grad_from_command_line_checked_too(capsys):
    assert refusal(["--train-shards", "x", "--clip-grad", "-1"], capsys).endswith("--clip-grad -1.0: must be >= 0")


@pytest.mark.parametrize(("cli", "ds", "world", "message"), [
    ([], {"train_batch_size": 31, "gradient_accumulation_steps": 1}, 2,
     "train_batch_size 31 is not divisible by grad accum 1 x 2 rank(s) (31 / 2 = 15.5)"),
    ([], {"train_batch_size": 31}, 2, "train_batch_size 31 is not divisible by grad accum 1 x 2 rank(s)"),
    (["--micro-batch", "8"], {"train_batch_size": 36}, 2,
     "train_batch_size 36 is not divisible by micro batch 8 x 2 rank(s) (36 / 16 = 2.25)"),
    (["--micro-batch", "8"], {"train_batch_size": 8}, 2, "train_batch_size 8 is not divisible by micro batch 8 x 2"),
    (["--micro-batch", "8", "--grad-accum", "2"], {"train_batch_size": 64}, 2,
     "train_batch_size 64 != micro batch 8 (command line) x grad accum 2 (command line) x 2 rank(s) = 32"),
    ([], {"train_micro_batch_size_per_gpu": 0}, 1, "train_micro_batch_size_per_gpu: 0 is not a positive integer"),
    ([], {"gradient_accumulation_steps": 0}, 1, "gradient_accumulation_steps: 0 is not a positive integer"),
])
def test_batch_sizes_that_do_not_divide_are_refused(cli, ds, world, message):
    config = parse_config(["--train-shards", "x", *cli])
    with pytest.raises(ConfigError) as e:
        resolve_batch(config.optim, ds, world, origin="ds.json")
    assert message in str(e.value)


def test_train_batch_size_alone_sets_the_micro_batch():
    plan = resolve_batch(OptimConfig(), {"train_batch_size": 64}, 2)
    assert (plan.micro_batch, plan.grad_accum, plan.global_batch) == (32, 1, 64)
    assert plan.sources == {"micro_batch": "deepspeed config train_batch_size", "grad_accum": "default"}


def shard_folder(tmp_path: Path, total: int) -> Path:
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"shards": [{"name": "a.tar", "samples": total}],
                                                      "total": total}))
    # the source resolver refuses a listed shard that is missing, or too small for its count
    (folder / "a.tar").write_bytes(bytes(512 * total))
    return folder


def test_prepare_refuses_a_micro_batch_larger_than_the_data(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    folder = shard_folder(tmp_path, 12)
    base = ["--train-shards", str(folder), "--deepspeed_config", str(REPO_CONFIGS[0].parent / "cpu.json")]
    with pytest.raises(ConfigError) as e:
        prepare(parse_config([*base, "--micro-batch", "8", "--steps-per-epoch", "5"]), 2)
    assert str(e.value) == (f"{folder / 'manifest.json'}: 12 samples over 2 rank(s) are 6 per rank, fewer than one "
                            "micro batch of 8 (command line); lower --micro-batch")
    run = prepare(parse_config([*base, "--micro-batch", "6"]), 2)
    assert (run.plan.global_batch, run.steps_per_epoch, run.ds_config["train_batch_size"]) == (12, 1, 12)


DEEP_JSON = "[" * 10000 + "]" * 10000


def test_deeply_nested_json_is_refused_in_one_line(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"a": ' + DEEP_JSON + "}")
    with pytest.raises(ConfigError) as e:
        load_ds_config(path)
    assert str(e.value).startswith(f"--deepspeed_config {path}: nested deeper than 32 levels")
    # brackets inside strings do not count
    path.write_text('{"flops_profiler": {"output_file": "' + "[{" * 40 + '"}, "train_batch_size": 8}')
    assert load_ds_config(path)["train_batch_size"] == 8


@pytest.mark.parametrize(("manifest", "classes", "message"), [
    (DEEP_JSON, None, "manifest.json: not valid JSON (nested deeper than 32 levels"),
    (None, DEEP_JSON, "classes.json: not valid JSON (nested deeper than 32 levels"),
    (None, [{"index": 0, "name": "a"}, {"index": -1, "name": "b"}], "class index -1 is outside 0..1"),
    (None, [{"index": 0, "name": "a"}, {"index": 10**18, "name": "b"}], f"class index {10**18} is outside 0..1"),
    (None, [{"index": 1, "name": "a"}, {"index": 1, "name": "b"}], "class index 1 appears twice"),
])
def test_manifest_and_classes_are_read_as_bounded_data(manifest, classes, message, tmp_path):
    folder = shard_folder(tmp_path, 12)
    if manifest is not None:
        (folder / "manifest.json").write_text(manifest)
    if classes is not None:
        (folder / "classes.json").write_text(classes if isinstance(classes, str) else json.dumps(classes))
    with pytest.raises(DataError) as e:
        open_source("--train-shards", str(folder), None, parse_config(["--train-shards", str(folder)]).data.access)
    assert str(e.value).startswith(f"--train-shards {folder}: ") and message in str(e.value)
    assert "\n" not in str(e.value)
