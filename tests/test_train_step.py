"""The training step in process: target builder and loss compile whole (no graph breaks),
compiled and eager steps agree, a non-finite micro batch adds exactly nothing, and on a GPU
a step runs under ``torch.cuda.set_sync_debug_mode("error")``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._inductor.config

from lvvit.loader.targets import build_token_targets, crop_weights, targets_from_weights
from lvvit.models import create_model
from lvvit.models.lvvit import box_mask
from lvvit.train.loss import TokenLabelingLoss
from lvvit.train.step import STEP_STATS, Objective, PlainEngine, train_step

CLASSES = 5
TINY = {"img_size": 32, "num_classes": CLASSES, "embed_dim": 32, "depth": 1, "num_heads": 2, "stem_width": 8,
        "patch_size": 8, "drop_path_rate": 0.0}


def label_batch(seed: int, batch: int = 4, img_size: int = 32, map_size: int = 6) -> dict[str, torch.Tensor]:
    """A loader-shaped CPU batch: uint8 images, labels, top-3 maps, crops and flips."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.rand(batch, 2, generator=g) * 0.4
    return {
        "images": torch.randint(0, 256, (batch, 3, img_size, img_size), dtype=torch.uint8, generator=g),
        "labels": torch.randint(0, CLASSES, (batch,), generator=g),
        "tlm_values": torch.randn(batch, 3, map_size, map_size, generator=g) * 3,
        "tlm_indices": torch.randint(0, CLASSES, (batch, 3, map_size, map_size), generator=g),
        "map_boxes": torch.tensor([[0.05, 0.0, 0.95, 1.0]]).repeat(batch, 1),
        "crop_boxes": torch.cat([lo, lo + 0.3 + 0.3 * torch.rand(batch, 2, generator=g)], dim=1),
        "flips": torch.tensor([True, False] * (batch // 2)),
    }


def objective(model, loss_fn=None, device: str = "cpu") -> Objective:
    return Objective(loss_fn=TokenLabelingLoss() if loss_fn is None else loss_fn, num_classes=CLASSES, token_grid=model.cfg.grid_size,
                     smoothing=0.1, device=torch.device(device), dtype=torch.float32)


def test_target_builder_and_loss_compile_without_graph_breaks():
    """``fullgraph=True`` fails on any graph break; the compiled results equal eager ones."""
    batch = label_batch(0)
    weights = crop_weights(batch["map_boxes"], batch["crop_boxes"], batch["flips"], (6, 6), out_size=4)
    args = (batch["tlm_values"], batch["tlm_indices"], weights, CLASSES, 0.1)
    compiled_targets = torch.compile(targets_from_weights, fullgraph=True, backend="aot_eager")
    cls_t, tok_t = compiled_targets(*args)
    ref_cls, ref_tok = build_token_targets(batch["tlm_values"], batch["tlm_indices"], batch["map_boxes"],
                                           batch["crop_boxes"], batch["flips"], CLASSES, out_size=4)
    assert tok_t.shape == (4, 16, CLASSES)
    torch.testing.assert_close(cls_t, ref_cls)
    torch.testing.assert_close(tok_t, ref_tok)

    loss_fn = TokenLabelingLoss(ground_truth=True)
    compiled_loss = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(1)
    cls_logits = torch.randn(4, CLASSES, generator=g, requires_grad=True)
    aux_logits = torch.randn(4, 16, CLASSES, generator=g, requires_grad=True)
    for mask in (box_mask((1, 0, 3, 2), 4, 4), box_mask((0, 1, 4, 4), 4, 4), None):  # MixToken boxes, none
        outputs = (cls_logits, aux_logits, mask)
        got = compiled_loss(outputs, batch["labels"], cls_t, tok_t)
        want = loss_fn(outputs, batch["labels"], ref_cls, ref_tok)
        for g_part, w_part in zip(got, want, strict=True):
            torch.testing.assert_close(g_part, w_part)
        got.loss.backward()
        assert torch.isfinite(cls_logits.grad).all() and cls_logits.grad.abs().sum() > 0


def test_compiled_and_eager_steps_give_the_same_loss():
    """``--compile``'s pieces (module compiled in place, loss compiled, inductor on CPU) give
    the eager step's loss and update on a tiny model, two steps, MixToken on."""
    torch.manual_seed(0)
    eager = create_model("lvvit_t", **TINY)
    compiled = copy.deepcopy(eager)
    initial = eager.head.weight.detach().clone()
    compiled.compile()
    results = {}
    for name, model, loss_fn in (("eager", eager, TokenLabelingLoss()),
                                 ("compiled", compiled, torch.compile(TokenLabelingLoss()))):
        engine = PlainEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
        torch.manual_seed(1)  # the same MixToken boxes on both sides: inductor draws with eager's RNG
        with torch._inductor.config.patch(fallback_random=True):
            stats = [train_step(engine, objective(model, loss_fn), [label_batch(s)]) for s in (2, 3)]
        results[name] = (torch.stack(stats), [p.detach().clone() for p in model.parameters()])
    (eager_stats, eager_params), (comp_stats, comp_params) = results["eager"], results["compiled"]
    assert eager_stats[:, STEP_STATS.index("finite_micro_batches")].tolist() == [1.0, 1.0]
    assert eager_stats[0, 0] > 1.0  # a real soft-target loss, not a zero from a mask
    torch.testing.assert_close(comp_stats, eager_stats, rtol=1e-4, atol=1e-5)
    for got, want in zip(comp_params, eager_params, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
    assert not torch.equal(eager.head.weight, initial)  # the steps did update


def test_compiled_step_does_not_recompile_for_new_mixtoken_boxes():
    """A new MixToken box every step is data to the compiled model and loss, not a new
    graph: after one warm-up step, steps with other boxes run with recompiling forbidden."""
    torch.manual_seed(0)
    model = create_model("lvvit_t", **TINY, mix_generator=torch.Generator().manual_seed(0))
    model.compile(backend="aot_eager")
    engine = PlainEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    compiled_loss, masks = torch.compile(TokenLabelingLoss(), backend="aot_eager"), []

    def loss_fn(outputs, *targets):  # eager: records each step's mask, then the compiled loss
        masks.append(outputs[2].clone())
        return compiled_loss(outputs, *targets)

    step_objective = objective(model, loss_fn)
    train_step(engine, step_objective, [label_batch(0)])
    with torch.compiler.set_stance("fail_on_recompile"):
        stats = [train_step(engine, step_objective, [label_batch(s)]) for s in range(1, 7)]
    assert len({tuple(m.flatten().tolist()) for m in masks}) >= 3  # the boxes did change
    assert all(torch.isfinite(s).all() and s[STEP_STATS.index("finite_micro_batches")] == 1 for s in stats)


def test_non_finite_micro_batch_adds_nothing_and_is_counted():
    """Accumulating [good, NaN teacher logits] over 2 micro batches updates exactly like the
    good one alone at half the rate (plain SGD), and the step reports 1 finite, 1 not."""
    def model_and_engine(lr: float, accum: int):
        torch.manual_seed(0)
        model = create_model("lvvit_t", **TINY, mix_token=False)
        return model, PlainEngine(model, torch.optim.SGD(model.parameters(), lr=lr), grad_accum=accum)

    good, bad = label_batch(4), label_batch(5)
    bad["tlm_values"][1, 0, 2, 3] = float("nan")
    model, engine = model_and_engine(lr=1.0, accum=2)
    stats = train_step(engine, objective(model), [good, bad])
    ref_model, ref_engine = model_and_engine(lr=0.5, accum=1)
    ref_stats = train_step(ref_engine, objective(ref_model), [good])

    assert engine.global_steps == 1
    assert stats[STEP_STATS.index("finite_micro_batches")] == 1
    assert stats[STEP_STATS.index("non_finite_micro_batches")] == 1
    torch.testing.assert_close(stats[:4], ref_stats[:4])  # loss sums of the good micro batch only
    for (name, p), ref in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        assert torch.isfinite(p).all(), name
        torch.testing.assert_close(p, ref, rtol=1e-5, atol=1e-7, msg=name)
    initial, _ = model_and_engine(lr=0.0, accum=1)
    assert not torch.equal(ref_model.head.weight, initial.head.weight)  # the good batch did update


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_step_makes_no_host_synchronisation():
    """After a warm-up step (allocator, cuBLAS handles), a whole step queues without the host
    waiting on the device: any synchronising call raises under sync debug mode "error"."""
    torch.manual_seed(0)
    model = create_model("lvvit_t", **TINY).cuda()
    engine = PlainEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-3), grad_accum=2)
    step_objective = objective(model, device="cuda")
    batches = [{k: v.pin_memory() for k, v in label_batch(s).items()} for s in range(4)]
    train_step(engine, step_objective, batches[:2])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = train_step(engine, step_objective, batches[2:])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert engine.global_steps == 2
    assert stats[STEP_STATS.index("finite_micro_batches")].item() == 2
