"""The determinism contract of vae_dist.step: which rows and which noise of each global batch a
process takes, whatever the number of processes and micro-batches."""

from __future__ import annotations

import pytest
import torch

from vae_dist.config import load_config
from vae_dist.step import UpdateGuard, learning_rate, make_optimizer, process_rows, process_slices, step_noise


@pytest.mark.parametrize(("batch", "accum", "world"), [(12, 1, 1), (12, 1, 2), (12, 2, 2), (12, 3, 4), (8, 4, 2)])
def test_every_image_of_a_global_batch_is_taken_once_in_a_fixed_place(batch, accum, world):
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    for step in range(3):
        taken = {}
        for rank in range(world):
            slices = process_slices(batch, accum, world, rank)
            rows = process_rows(order, step, batch, slices)
            assert len(rows) == batch // world
            local = batch // accum // world
            for m, part in enumerate(slices):
                # The m-th micro-batch's rows of this process are the batch's rows at `part`, in order:
                # the noise rows eps[part] belong to exactly these images.
                assert torch.equal(rows[m * local : (m + 1) * local], order[step * batch :][part])
                taken.update({i: (rank, m) for i in range(part.start, part.stop)})
        assert sorted(taken) == list(range(batch))  # each row of the global batch exactly once
        # Micro-batches go in order: every row of micro-batch m comes before those of m + 1.
        assert [taken[i][1] for i in range(batch)] == sorted(taken[i][1] for i in range(batch))


def test_the_step_noise_depends_on_the_seed_and_step_only():
    eps, uniform = step_noise(1, 7, 12, 4, (1, 2, 2), binarize=True)
    again, _ = step_noise(1, 7, 12, 4, (1, 2, 2), binarize=False)
    assert torch.equal(eps, again) and uniform.shape == (12, 1, 2, 2)  # binarising does not move eps
    assert not torch.equal(eps, step_noise(1, 8, 12, 4, (1, 2, 2), binarize=False)[0])
    assert not torch.equal(eps, step_noise(2, 7, 12, 4, (1, 2, 2), binarize=False)[0])


def guarded_step(guard, grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], bool]:
    """One guarded update of two parameters with the given gradients: the weights after it."""
    from accelerate import Accelerator

    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    optimizer = torch.optim.SGD(params, lr=1.0)
    went = guard.allows(Accelerator(cpu=True), params)
    if went:
        optimizer.step()
    return [p.detach() for p in params], went


def test_the_update_guard_skips_non_finite_and_too_large_gradients_and_clips_the_rest():
    cfg = load_config("linear", {"train.grad_clip": 1.0, "train.skip_threshold": 100.0})
    guard = UpdateGuard.from_config(cfg)
    small = [torch.full((3,), 0.1), torch.full((2, 2), 0.1)]  # norm sqrt(7) * 0.1 < 1: as is
    weights, went = guarded_step(guard, small)
    assert went and not guard.last_skipped and guard.last_norm == pytest.approx(7**0.5 * 0.1)
    assert torch.allclose(weights[0], torch.full((3,), 0.9))
    big = [torch.full((3,), 3.0), torch.full((2, 2), 4.0)]  # norm sqrt(27 + 64) > 1: clipped to 1
    weights, went = guarded_step(guard, big)
    assert went and guard.last_norm == pytest.approx(91 ** 0.5)
    step = torch.cat([(1 - w).flatten() for w in weights])
    assert step.norm().item() == pytest.approx(1.0, rel=1e-5)
    for bad in ([torch.full((3,), 40.0), torch.full((2, 2), 40.0)], [torch.tensor([1.0, float("nan"), 1.0]), small[1]]):
        weights, went = guarded_step(guard, bad)  # norm 105.8 > 100, then a NaN: no update
        assert not went and guard.last_skipped
    assert UpdateGuard.from_config(load_config("linear")) is None  # neither asked for: no norm taken


def test_the_learning_rate_warms_up_linearly_and_weight_decay_makes_adamw():
    cfg = load_config("linear", {"train.lr": 1e-3, "train.warmup_steps": 4})
    assert [learning_rate(cfg, step) for step in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert learning_rate(load_config("linear"), 0) == 1e-3
    model = torch.nn.Linear(2, 2)
    assert type(make_optimizer(model, cfg, torch.device("cpu"))) is torch.optim.Adam
    adamw = make_optimizer(model, load_config("linear", {"train.weight_decay": 0.1}), torch.device("cpu"))
    assert type(adamw) is torch.optim.AdamW and adamw.param_groups[0]["weight_decay"] == 0.1


def test_a_skipped_update_leaves_a_loss_scaler_ready_for_the_next_step():
    # fp16: the guard unscales the gradients to take their norm; a skip must start the scaler's
    # next step (else its next unscale fails), and leave its scale alone.
    from types import SimpleNamespace

    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    def clip_grad_norm_(parameters, max_norm):  # as Accelerate's: unscale first
        scaler.unscale_(optimizer)
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    accelerator = SimpleNamespace(scaler=scaler, num_processes=1, clip_grad_norm_=clip_grad_norm_)
    guard = UpdateGuard(clip=0.0, skip_threshold=1.0)
    for _ in range(2):
        scaler.scale(torch.ones(()))  # as the step's backward does
        param.grad = torch.full((3,), 40.0)  # 4 x 10 unscaled: norm 17 > 1
        assert not guard.allows(accelerator, [param]) and guard.last_skipped
    assert scaler.get_scale() == 4.0 and torch.equal(param.detach(), torch.ones(3))
    guard.note(torch.tensor([1.0, float("inf")]))  # a loss that is not finite: skipped, gradients or not
    scaler.scale(torch.ones(()))
    param.grad = torch.full((3,), 0.4)
    assert not guard.allows(accelerator, [param])
    scaler.scale(torch.ones(()))
    param.grad = torch.full((3,), 0.4)
    assert guard.allows(accelerator, [param]) and guard.last_norm == pytest.approx(3**0.5 * 0.1)  # unscaled by 4
