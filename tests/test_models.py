"""LV-ViT models: architecture against the official numbers, checkpoints, MixToken, outputs."""

from __future__ import annotations

import argparse
import logging
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from lvvit.models import (
    CheckpointError,
    ClassCountMismatch,
    create_model,
    load_checkpoint,
    model_config,
    model_from_checkpoint,
    read_checkpoint,
    read_state_dict,
    resize_pos_embed,
)
from lvvit.models.lvvit import Attention, box_mask, drop_path, sample_mix_box

TINY = dict(embed_dim=48, depth=2, num_heads=2, stem_width=16)

# DESIGN.md section 4: (dim, depth, stem width, state_dict entries) and params per img_size.
VARIANTS = {
    "lvvit_t": (240, 12, 64, 160),
    "lvvit_s": (384, 16, 64, 204),
    "lvvit_m": (512, 20, 64, 248),
    "lvvit_l": (768, 24, 128, 292),
}
PARAMS = {
    ("lvvit_t", 224): 8_534_720,
    ("lvvit_s", 224): 26_151_824,
    ("lvvit_s", 384): 26_297_744,
    ("lvvit_s", 448): 26_377_616,
    ("lvvit_s", 512): 26_469_776,
    ("lvvit_m", 224): 55_830_544,
    ("lvvit_m", 384): 56_025_104,
    ("lvvit_m", 448): 56_131_600,
    ("lvvit_m", 512): 56_254_480,
    ("lvvit_l", 224): 150_021_968,
    ("lvvit_l", 384): 150_313_808,
    ("lvvit_l", 448): 150_473_552,
    ("lvvit_l", 512): 150_657_872,
}


def tiny(img_size: int = 64, num_classes: int = 10, **overrides):
    return create_model("lvvit_t", img_size=img_size, num_classes=num_classes, **{**TINY, **overrides})


def official_shapes(dim: int, depth: int, stem: int, classes: int, grid: int) -> dict[str, tuple]:
    """Key -> shape of the official TokenLabeling LV_ViT state dict, written from its code."""
    shapes: dict[str, tuple] = {"cls_token": (1, 1, dim), "pos_embed": (1, grid * grid + 1, dim)}
    shapes["patch_embed.conv1.weight"] = (stem, 3, 7, 7)
    shapes["patch_embed.conv2.weight"] = (stem, stem, 3, 3)
    shapes["patch_embed.conv3.weight"] = (stem, stem, 3, 3)
    for bn in ("bn1", "bn2", "bn3"):
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"patch_embed.{bn}.{name}"] = (stem,)
        shapes[f"patch_embed.{bn}.num_batches_tracked"] = ()
    shapes["patch_embed.proj.weight"] = (dim, stem, 8, 8)
    shapes["patch_embed.proj.bias"] = (dim,)
    for i in range(depth):
        b = f"blocks.{i}"
        shapes.update({
            f"{b}.norm1.weight": (dim,), f"{b}.norm1.bias": (dim,),
            f"{b}.attn.qkv.weight": (3 * dim, dim),
            f"{b}.attn.proj.weight": (dim, dim), f"{b}.attn.proj.bias": (dim,),
            f"{b}.norm2.weight": (dim,), f"{b}.norm2.bias": (dim,),
            f"{b}.mlp.fc1.weight": (3 * dim, dim), f"{b}.mlp.fc1.bias": (3 * dim,),
            f"{b}.mlp.fc2.weight": (dim, 3 * dim), f"{b}.mlp.fc2.bias": (dim,),
        })
    shapes.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    for head in ("head", "aux_head"):
        shapes[f"{head}.weight"] = (classes, dim)
        shapes[f"{head}.bias"] = (classes,)
    return shapes


def official_checkpoint(weights: dict, ema: dict, prefix: str = "") -> dict:
    """A dict shaped like the released files (timm CheckpointSaver): weights, EMA, args, extras."""
    return {
        "epoch": 309,
        "arch": "lvvit_t",
        "state_dict": {prefix + k: v for k, v in weights.items()},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-5, "params": [0]}]},
        "version": 2,
        "args": argparse.Namespace(model="lvvit_t", lr=1.6e-3, img_size=None, mean=(0.485, 0.456, 0.406),
                                   token_label=True, device="cuda:0"),
        "state_dict_ema": dict(ema),
        "metric": 79.1,
    }


def assert_same_state(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


# ---------------------------------------------------------------- architecture


@pytest.mark.parametrize(("name", "img_size"), sorted(PARAMS))
def test_parameter_counts_match_official(name, img_size):
    with torch.device("meta"):  # no memory, no init cost: only shapes matter here
        model = create_model(name, img_size=img_size)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name, img_size]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_state_dict_keys_and_shapes_are_official(name):
    dim, depth, stem, entries = VARIANTS[name]
    with torch.device("meta"):
        model = create_model(name, img_size=384)
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert actual == official_shapes(dim, depth, stem, 1000, 24)
    assert len(actual) == entries


def test_variant_defaults_follow_design():
    for name, rate, crop in (("lvvit_t", 0.1, 0.9), ("lvvit_s", 0.1, 0.9), ("lvvit_m", 0.2, 1.0),
                             ("lvvit_l", 0.3, 1.0)):
        cfg = model_config(name)
        assert (cfg.drop_path_rate, cfg.crop_pct, cfg.mlp_ratio) == (rate, crop, 3.0)
    assert model_config("lvvit_s").skip_lam == 2.0 and model_config("lvvit_l").skip_lam == 3.0


def test_init_follows_official():
    model = tiny(depth=4)
    assert torch.all(model.norm.weight == 1) and torch.all(model.norm.bias == 0)
    weights = torch.cat([b.mlp.fc1.weight.flatten() for b in model.blocks])
    assert weights.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.all(model.blocks[0].mlp.fc1.bias == 0)
    assert model.blocks[0].attn.qkv.bias is None


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("prefix", ["", "module."])
def test_official_checkpoint_round_trip(tmp_path, prefix):
    source, ema = tiny(), tiny()
    path = tmp_path / "lvvit_t-official.pth.tar"
    torch.save(official_checkpoint(source.state_dict(), ema.state_dict(), prefix), path)

    weights = read_state_dict(path)
    fresh = tiny()
    fresh.load_state_dict(weights, strict=True)  # names are the official ones: no renaming
    assert_same_state(fresh.state_dict(), source.state_dict())

    loaded = create_model("lvvit_t", img_size=64, num_classes=10, checkpoint=path, **TINY)
    assert_same_state(loaded.state_dict(), source.state_dict())
    loaded_ema = create_model("lvvit_t", img_size=64, num_classes=10, checkpoint=path, use_ema=True, **TINY)
    assert_same_state(loaded_ema.state_dict(), ema.state_dict())


@pytest.mark.parametrize("container", ["raw", "model", "module", "compiled"])
def test_other_checkpoint_layouts(tmp_path, container):
    source = tiny()
    weights = source.state_dict()
    content = {
        "raw": weights,
        "model": {"model": weights, "epoch": 1},
        "module": {"module": {f"module.{k}": v for k, v in weights.items()}},
        "compiled": {f"_orig_mod.{k}": v for k, v in weights.items()},
    }[container]
    path = tmp_path / "weights.pt"
    torch.save(content, path)
    model = tiny()
    load_checkpoint(model, path)
    assert_same_state(model.state_dict(), weights)


def test_missing_batchnorm_counter_is_tolerated(tmp_path):
    """Checkpoints from before PyTorch 0.4.1 have no num_batches_tracked."""
    source = tiny()
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in source.state_dict().items() if "num_batches_tracked" not in k}, path)
    model = tiny()
    load_checkpoint(model, path)
    assert torch.equal(model.patch_embed.bn1.running_var, source.patch_embed.bn1.running_var)


def cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys' cubic convolution weights for the 4 neighbours at fractional offset t."""
    def k(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a if x < 2 else 0.0
    return [k(t + 1), k(t), k(1 - t), k(2 - t)]


def bicubic_matrix(old: int, new: int) -> torch.Tensor:
    """[new, old] resampling matrix: half-pixel centres, border samples repeated."""
    m = torch.zeros(new, old, dtype=torch.float64)
    for i in range(new):
        src = (i + 0.5) * old / new - 0.5
        base = math.floor(src)
        for j, w in zip(range(base - 1, base + 3), cubic_weights(src - base), strict=True):
            m[i, min(max(j, 0), old - 1)] += w
    return m


def test_resize_pos_embed_is_bicubic_on_the_grid_and_keeps_class_position():
    dim, old, new = 5, 14, 24  # 224 -> 384
    pos = torch.randn(1, 1 + old * old, dim)
    out = resize_pos_embed(pos, new)
    assert out.shape == (1, 1 + new * new, dim)
    assert torch.equal(out[:, 0], pos[:, 0])
    m = bicubic_matrix(old, new)
    grid = pos[0, 1:].reshape(old, old, dim).double()
    expected = torch.einsum("ir,rcd,jc->ijd", m, grid, m).reshape(new * new, dim)
    torch.testing.assert_close(out[0, 1:].double(), expected, atol=1e-5, rtol=0)


def test_resize_pos_embed_keeps_a_ramp_a_ramp():
    old, new = 14, 24
    r = torch.arange(old, dtype=torch.float32)
    rows = r[:, None].expand(old, old)  # channel 0 grows down the rows, channel 1 along columns
    grid = torch.stack((rows, rows.T * 2.0), dim=-1).reshape(1, old * old, 2)
    pos = torch.cat((torch.tensor([[[100.0, -100.0]]]), grid), dim=1)
    resized = resize_pos_embed(pos, new)
    assert torch.equal(resized[0, 0], torch.tensor([100.0, -100.0]))  # never blended into the grid
    out = resized[0, 1:].reshape(new, new, 2)
    down, across = out[..., 0], out[..., 1]
    assert torch.allclose(down, down[:, :1].expand(new, new))  # constant along columns
    assert torch.allclose(across, across[:1, :].expand(new, new))  # constant along rows
    src = (torch.arange(new) + 0.5) * old / new - 0.5
    for line, slope in ((down[:, 0], 1.0), (across[0, :], 2.0)):
        assert torch.all(line.diff() > 0)  # still increasing everywhere
        # Bicubic (a = -0.75) follows a line to within a few hundredths of a step inside.
        assert torch.allclose(line[3:-3], slope * src[3:-3], atol=0.06 * slope)
        assert line.diff().std() < 0.1 * slope  # even steps: smooth


def test_load_checkpoint_resizes_pos_embed_224_to_384(tmp_path, caplog):
    source = tiny(img_size=224)
    path = tmp_path / "at224.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    model = tiny(img_size=384)
    with caplog.at_level(logging.INFO, logger="lvvit.models.checkpoint"):
        load_checkpoint(model, path)
    assert "resized pos_embed" in caplog.text
    assert torch.equal(model.pos_embed, resize_pos_embed(source.pos_embed.detach(), 24))
    assert torch.equal(model.pos_embed[:, 0], source.pos_embed[:, 0])
    assert torch.equal(model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    assert model(torch.randn(1, 3, 384, 384))[0].shape == (1, 10)


def test_class_count_mismatch_reinitialises_heads(tmp_path, caplog):
    source = tiny(num_classes=1000)
    path = tmp_path / "imagenet.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    model = tiny(num_classes=7)
    with torch.no_grad():
        for head in (model.head, model.aux_head):
            head.weight.fill_(5.0)
            head.bias.fill_(5.0)
    with caplog.at_level(logging.WARNING, logger="lvvit.models.checkpoint"):
        load_checkpoint(model, path)
    assert "1000 classes" in caplog.text and "re-initialised" in caplog.text
    assert torch.equal(model.norm.weight, source.norm.weight)
    assert torch.equal(model.pos_embed, source.pos_embed)
    for head in (model.head, model.aux_head):
        assert head.weight.shape == (7, 48)
        assert torch.all(head.bias == 0)
        assert head.weight.std().item() == pytest.approx(0.02, rel=0.2)


def test_model_from_checkpoint_reads_the_file_once(tmp_path):
    """The builder takes what ``read_checkpoint`` read: the file is not opened again."""
    source = tiny(num_classes=7)
    path = tmp_path / "ours.pth"
    torch.save({"state_dict": source.state_dict(), "model_args": {"name": "lvvit_t", "num_classes": 7}}, path)
    checkpoint = read_checkpoint(path)
    path.unlink()
    model = model_from_checkpoint("lvvit_t", checkpoint, img_size=64, **TINY)
    assert checkpoint.model_args == {"name": "lvvit_t", "num_classes": 7}
    assert model.num_classes == 7  # no count asked for: the file's classifier decides
    assert torch.equal(model.head.weight, source.head.weight)
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_model_from_checkpoint_head_policy(tmp_path):
    """Keeping classes (eval, export, teacher) refuses another count and names the file;
    fine-tuning to a new label set re-initialises both heads and keeps the rest."""
    source = tiny(num_classes=7)
    path = tmp_path / "seven.pth"
    torch.save(source.state_dict(), path)
    checkpoint = read_checkpoint(path)
    with pytest.raises(ClassCountMismatch, match=r"seven\.pth: the checkpoint has 7 classes, the model 3") as err:
        model_from_checkpoint("lvvit_t", checkpoint, img_size=64, num_classes=3, **TINY)
    assert err.value.found == 7
    model = model_from_checkpoint("lvvit_t", checkpoint, img_size=64, num_classes=3, keep_classes=False, **TINY)
    assert model.head.weight.shape == model.aux_head.weight.shape == (3, 48)
    assert torch.all(model.head.bias == 0)
    assert torch.equal(model.norm.weight, source.norm.weight)
    assert model_from_checkpoint("lvvit_t", None, img_size=64, **TINY).num_classes == 1000


def test_reset_classifier_keeps_dtype_and_config():
    model = tiny().to(torch.bfloat16)
    model.reset_classifier(3)
    assert model.head.weight.dtype == model.aux_head.bias.dtype == torch.bfloat16
    assert model.cfg.num_classes == model.num_classes == 3
    assert model.eval()(torch.randn(2, 3, 64, 64, dtype=torch.bfloat16)).shape == (2, 3)


# ---------------------------------------------------------------- bad checkpoint input


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        read_state_dict(path)
    with pytest.raises(CheckpointError, match="not a file"):
        read_state_dict(tmp_path)


@pytest.mark.parametrize("content", ["text", "empty", "truncated", "truncated_legacy"])
def test_unreadable_file_is_named(tmp_path, content):
    path = tmp_path / f"{content}.pth"
    if content == "text":
        path.write_text("these are not the weights you are looking for\n")
    elif content == "empty":
        path.write_bytes(b"")
    else:
        torch.save(tiny().state_dict(), path, _use_new_zipfile_serialization=content == "truncated")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match=rf"{content}\.pth: not a readable PyTorch checkpoint"):
        read_state_dict(path)


class CodeInPickle:
    """Unpickling this runs code: it writes a file at the given path."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("zip", r"refusing to unpickle (builtins\.)?exec;"),
        ("legacy", r"refusing to unpickle (builtins\.)?exec;"),
        ("pickle2", r"refusing to unpickle (builtins\.)?exec;"),
        ("pickle5", r"not a readable PyTorch checkpoint .*: Unsupported operand"),
    ],
)
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_arbitrary_objects_are_never_unpickled(tmp_path, fmt, expected):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    content = {"state_dict": tiny().state_dict(), "payload": CodeInPickle(str(marker))}
    if fmt.startswith("pickle"):  # no tensors: plain pickles of tensors are refused for those
        path.write_bytes(pickle.dumps({"payload": content["payload"]}, protocol=int(fmt[-1])))
    else:
        torch.save(content, path, _use_new_zipfile_serialization=fmt == "zip")
    with pytest.raises(CheckpointError, match=r"evil\.pth: " + expected):
        load_checkpoint(tiny(), path)
    assert not marker.exists()


def test_wrong_shapes_are_named_and_leave_the_model_untouched(tmp_path, caplog):
    path = tmp_path / "wide.pth"
    torch.save({"state_dict": tiny(embed_dim=64).state_dict()}, path)
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(model, path)
    message = str(err.value)
    assert "wide.pth" in message and "embed_dim=48" in message
    assert "patch_embed.proj.weight: checkpoint (64, 16, 8, 8), model (48, 16, 8, 8)" in message
    assert "re-initialised" not in caplog.text  # same class count: the heads are just mis-shaped
    assert_same_state(model.state_dict(), before)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    weights = tiny(depth=3).state_dict()
    del weights["norm.bias"]
    path = tmp_path / "deeper.pth"
    torch.save(weights, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tiny(), path)
    message = str(err.value)
    assert "deeper.pth" in message and "depth=2" in message
    assert "missing (1): norm.bias" in message
    assert "unexpected (11): blocks.2." in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (torch.zeros(3), "found a Tensor"),
        ({"epoch": 3, "args": argparse.Namespace(lr=1.0)}, "expected a raw state dict"),
        ({"state_dict": {"a": torch.zeros(1), "b": [1, 2]}}, "entry 'b' holds a list"),
        ({}, "found keys nothing"),
    ],
)
def test_malformed_content_is_named(tmp_path, content, expected):
    path = tmp_path / "odd.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=r"odd\.pth") as err:
        read_state_dict(path)
    assert expected in str(err.value)


def test_asking_for_ema_that_is_absent(tmp_path):
    path = tmp_path / "no-ema.pth"
    torch.save({"state_dict": tiny().state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"no-ema\.pth: expected 'state_dict_ema' or 'model_ema'"):
        read_state_dict(path, use_ema=True)


# ---------------------------------------------------------------- forward semantics


def mixing_seed(grid: int) -> int:
    """A seed whose MixToken box covers part of the grid (not none of it, not all of it)."""
    for seed in range(100):
        x0, y0, x1, y1 = sample_mix_box(grid, grid, torch.Generator().manual_seed(seed))
        if 0 < (x1 - x0) * (y1 - y0) < grid * grid and x1 - x0 != y1 - y0:
            return seed
    raise AssertionError("no seed in 100 gives a partial box")


def test_mix_box_is_reproducible_and_within_the_grid():
    boxes = [sample_mix_box(14, 14, torch.Generator().manual_seed(s)) for s in range(200)]
    assert boxes == [sample_mix_box(14, 14, torch.Generator().manual_seed(s)) for s in range(200)]
    assert len(set(boxes)) > 50
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 <= x1 <= 14 and 0 <= y0 <= y1 <= 14
    torch.manual_seed(5)
    first = sample_mix_box(14, 14)
    torch.manual_seed(5)
    assert sample_mix_box(14, 14) == first  # the global RNG works as well


def test_mixtoken_swaps_the_box_and_unmixes_aux():
    """Each token in the box comes back to its own sample's row after the blocks."""
    seed = mixing_seed(4)
    model = tiny(drop_path_rate=0.0, mix_generator=torch.Generator().manual_seed(seed)).train()
    with torch.no_grad():  # attention output no longer depends on other tokens: tokens stay apart
        for blk in model.blocks:
            blk.attn.proj.weight.zero_()
    x = torch.randn(3, 3, 64, 64)

    seen = {}
    hook = model.blocks[0].register_forward_pre_hook(lambda _m, args: seen.update(x=args[0]))
    _, aux, mask = model(x)
    hook.remove()
    box = sample_mix_box(4, 4, torch.Generator().manual_seed(seed))
    assert torch.equal(mask, box_mask(box, 4, 4))
    x0, y0, x1, y1 = box

    stem = model.patch_embed(x).permute(0, 2, 3, 1)
    mixed = stem.clone()
    mixed[:, y0:y1, x0:x1] = stem.flip(0)[:, y0:y1, x0:x1]  # rows y0:y1, columns x0:x1
    tokens = seen["x"][:, 1:] - model.pos_embed[:, 1:]
    torch.testing.assert_close(tokens, mixed.reshape(3, 16, -1), atol=1e-5, rtol=0)

    model.mix_token = False
    _, plain_aux, no_mask = model(x)
    assert no_mask is None
    torch.testing.assert_close(aux, plain_aux, atol=1e-5, rtol=0)
    inside = plain_aux.reshape(3, 4, 4, -1)[:, y0:y1, x0:x1]
    assert not torch.allclose(inside, inside.flip(0), atol=1e-3)  # un-mixing was needed


def test_same_generator_seed_gives_same_training_step():
    x = torch.randn(2, 3, 64, 64)
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = tiny(mix_generator=torch.Generator().manual_seed(3)).train()
        outs.append(model(x))
    assert torch.equal(outs[0][2], outs[1][2])
    assert torch.equal(outs[0][1], outs[1][1])


def test_eval_output_is_cls_plus_half_max_aux():
    model = tiny(num_classes=5).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        tokens = model.forward_features(x)
        cls, aux = model.head(tokens[:, 0]), model.aux_head(tokens[:, 1:])
    assert tokens.shape == (3, 17, 48)
    torch.testing.assert_close(out, cls + 0.5 * aux.max(dim=1).values, atol=1e-6, rtol=0)


def test_train_output_shapes():
    cls, aux, mask = tiny(num_classes=5).train()(torch.randn(2, 3, 64, 64))
    assert cls.shape == (2, 5) and aux.shape == (2, 16, 5) and mask.shape == (4, 4) and mask.dtype == torch.bool


def test_sdpa_attention_equals_explicit_softmax_form():
    torch.manual_seed(0)
    attn = Attention(48, num_heads=4)
    x = torch.randn(2, 17, 48)
    q, k, v = attn.qkv(x).reshape(2, 17, 3, 4, 12).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-2, -1) * 12**-0.5).softmax(dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 17, 48))
    torch.testing.assert_close(attn(x), expected, atol=1e-6, rtol=1e-5)


def test_grad_checkpointing_gives_the_same_gradients():
    x = torch.randn(2, 3, 64, 64)

    def grads(checkpointing: bool) -> tuple[dict, int]:
        torch.manual_seed(0)  # same weights, drop-path masks and MixToken box
        model = tiny(drop_path_rate=0.3).train()
        model.set_grad_checkpointing(checkpointing)
        calls = []
        model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
        cls, aux, _ = model(x)
        (cls.logsumexp(1).mean() + aux.square().mean()).backward()
        return {n: p.grad for n, p in model.named_parameters()}, len(calls)

    plain, plain_calls = grads(False)
    ckpt, ckpt_calls = grads(True)
    assert (plain_calls, ckpt_calls) == (1, 2)  # recomputed in backward
    for name, grad in plain.items():
        torch.testing.assert_close(ckpt[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_no_weight_decay_names_real_parameters():
    model = tiny()
    names = dict(model.named_parameters())
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    assert all(names[n].ndim == 3 for n in model.no_weight_decay())


def test_drop_path():
    torch.manual_seed(0)
    x = torch.ones(4000, 3)
    assert drop_path(x, 0.3, training=False) is x
    out = drop_path(x, 0.3, training=True)
    kept = out[:, 0] != 0
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.7))
    assert torch.all(out[~kept] == 0)
    assert kept.float().mean().item() == pytest.approx(0.7, abs=0.03)
    model = tiny(depth=4, drop_path_rate=0.3)
    rates = [blk.drop_path.prob for blk in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_lvvit_s_forward_backward_at_224():
    torch.manual_seed(0)
    model = create_model("lvvit_s").train()
    cls, aux, _ = model(torch.randn(2, 3, 224, 224))
    assert cls.shape == (2, 1000) and aux.shape == (2, 196, 1000)
    loss = F.cross_entropy(cls, torch.tensor([1, 2])) + aux.logsumexp(-1).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
