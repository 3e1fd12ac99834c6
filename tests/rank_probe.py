"""Launched by the tests under `accelerate launch`: trains like vae_dist/train.py, then every
process saves its own copy of the weights, so the tests can compare the ranks."""

import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from vae_dist.config import load_config
from vae_dist.training import train

out, config, *overrides = sys.argv[1:]
result = train(load_config(config, overrides))
rank = int(os.environ.get("RANK", "0"))
state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
save_file(state, str(Path(out) / f"rank{rank}.safetensors"))
(Path(out) / f"metrics{rank}.json").write_text(json.dumps(result.metrics))
