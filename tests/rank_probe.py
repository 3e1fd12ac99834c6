"""Launched by the tests under `accelerate launch`: trains like vae_dist/train.py, then every
process saves its own copy of the weights, so the tests can compare the ranks. With
POISON=RANK:CALL in the environment, that rank's CALL-th loss (counted from 1) is NaN."""

import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

import vae_dist.step
from vae_dist.config import load_config
from vae_dist.training import train

out, config, *overrides = sys.argv[1:]
rank = int(os.environ.get("RANK", "0"))
if "POISON" in os.environ:
    poisoned_rank, poisoned_call = map(int, os.environ["POISON"].split(":"))
    calls, loss_of = [], vae_dist.step.negative_elbo

    def poisoned(*args, **kwargs):
        terms = loss_of(*args, **kwargs)
        calls.append(1)
        if rank == poisoned_rank and len(calls) == poisoned_call:
            terms.loss = terms.loss * float("nan")
        return terms

    vae_dist.step.negative_elbo = poisoned
result = train(load_config(config, overrides))
state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
save_file(state, str(Path(out) / f"rank{rank}.safetensors"))
(Path(out) / f"metrics{rank}.json").write_text(json.dumps(result.metrics))
