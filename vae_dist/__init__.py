"""Variational autoencoders trained with Accelerate and exported to ONNX.

The Python API (docs/api.md): `vae_dist.load(run)` gives a trained `Model`, `vae_dist.train(config)`
trains a run. They are loaded on first use, so `import vae_dist` stays light.
"""

from vae_dist.version import __version__

__all__ = ["InputError", "Model", "__version__", "load", "train"]


def __getattr__(name: str):
    if name in ("InputError", "Model", "load", "train"):
        from vae_dist import api

        return getattr(api, name)
    raise AttributeError(f"module 'vae_dist' has no attribute {name!r}")
