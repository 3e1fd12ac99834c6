"""The determinism contract of vae_dist.step: which rows and which noise of each global batch a
process takes, whatever the number of processes and micro-batches."""

from __future__ import annotations

import pytest
import torch

from vae_dist.step import process_rows, process_slices, step_noise


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
