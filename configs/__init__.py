"""The shipped configurations; installed as the package data `vae_dist.configs`."""
