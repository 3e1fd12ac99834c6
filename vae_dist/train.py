"""The training script: `accelerate launch vae_dist/train.py --config configs/conv.yaml` starts it
on every process, and `vae-dist train` runs the same command (vae_dist.train_command; the loop is
vae_dist.training). Nothing imports this file, so the package's `vae_dist.train` stays the Python
API's function."""

from vae_dist.train_command import train_command

if __name__ == "__main__":
    train_command()
