"""The training script: `accelerate launch vae_dist/train.py --config configs/conv.yaml` starts it
on every process, and `vae-dist train` runs the same command. The loop is vae_dist.training; this
file only starts it, so that the package's `vae_dist.train` stays the Python API's function."""

from vae_dist.training import train_command

if __name__ == "__main__":
    train_command()
