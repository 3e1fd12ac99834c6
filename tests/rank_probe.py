"""Launched by the tests under `accelerate launch`: trains like vae_dist/train.py, then every
process saves its own copy of the weights, so the tests can compare the ranks. With
POISON=RANK:CALL in the environment, that rank's CALL-th loss (counted from 1) is NaN."""

import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

import vae_dist.step
from helpers import poisoned_losses  # beside this script
from vae_dist.config import load_config
from vae_dist.training import train

out, config, *overrides = sys.argv[1:]
rank = int(os.environ.get("RANK", "0"))
if "POISON" in os.environ:
    poisoned_rank, poisoned_call = map(int, os.environ["POISON"].split(":"))
    if rank == poisoned_rank:
        vae_dist.step.negative_elbo = poisoned_losses(vae_dist.step.negative_elbo, {poisoned_call})
result = train(load_config(config, overrides))
state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
save_file(state, str(Path(out) / f"rank{rank}.safetensors"))
(Path(out) / f"metrics{rank}.json").write_text(json.dumps(result.metrics))
