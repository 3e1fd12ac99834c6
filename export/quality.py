"""Judging an edge variant: the checks of the fp32 export (export.verify) against the variant's
own tolerance, then its quality cost on the whole test split, against the fp32 torch model.

Quality cost, with the fixed evaluation noise of export.verify (one eps per test image):
    neg_elbo_change   mean test -ELBO through the variant's encoder and decoder, minus fp32 torch's
                      (nats; from the decoder mean, as in export.verify)
    recon_mse_change  mean squared error per pixel of decode(mu) against the image, minus fp32 torch's

A variant is "verified" when every check passed and |neg_elbo_change| is within the budget;
otherwise it is "rejected", with the reasons.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from export.spec import SubModelSpec, vae_specs
from export.variants import VariantSpec
from export.verify import (
    BATCH_SIZES, NOISE_SEED, Check, Report, Scores, evaluation_noise, onnx_scores, torch_scores, verify_files,
)
from vae_dist.models import VAE


@dataclass
class Reference:
    """The fp32 torch model on the test split: computed once, shared by every variant."""

    images: torch.Tensor  # uint8 [N, C, H, W]
    eps: torch.Tensor  # the fixed noise, one row per image
    likelihood: str
    scores: Scores
    seed: int = NOISE_SEED

    @classmethod
    def compute(cls, model: VAE, images: torch.Tensor, likelihood: str, seed: int = NOISE_SEED) -> "Reference":
        eps = evaluation_noise(images.shape[0], model.latent_dim, seed)
        scores, _ = torch_scores(model.eval(), images, eps, likelihood)
        return cls(images, eps, likelihood, scores, seed)

    @classmethod
    def from_elbo(cls, elbo: dict[str, Any], model: VAE, images: torch.Tensor) -> "Reference":
        """The reference that the fp32 verification (export.verify.elbo_check) already computed."""
        if elbo.get("images") != images.shape[0]:
            raise ValueError(f"the -ELBO record covers {elbo.get('images')} images, not {images.shape[0]}")
        seed = elbo["noise_seed"]
        eps = evaluation_noise(images.shape[0], model.latent_dim, seed)
        return cls(images, eps, elbo["likelihood"], Scores(elbo["torch"], elbo["recon_mse_torch"]), seed)


@dataclass
class Verdict:
    status: str  # "verified" | "rejected"
    reasons: list[str]
    report: Report
    quality: dict[str, Any] | None = None
    specs: tuple[SubModelSpec, ...] = field(default_factory=tuple)


def variant_specs(model: VAE, variant: VariantSpec) -> tuple[SubModelSpec, ...]:
    """The fp32 contract, in the variant's files, with the variant's tolerances."""
    return tuple(s.with_file(variant.suffix, variant.atol[s.role]) for s in vae_specs(model))


def judge(
    onnx_dir: Path,
    variant: VariantSpec,
    model: VAE,
    model_meta: dict[str, Any],
    reference: Reference,
    budget: float,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
) -> Verdict:
    """Check the variant's files in `onnx_dir` and measure what the conversion costs."""
    specs = variant_specs(model, variant)
    checks, sessions = verify_files(Path(onnx_dir), specs, model, model_meta, reference.images, batch_sizes)
    report = Report(checks)
    quality = None
    if len(sessions) == 2:
        try:
            got = onnx_scores(sessions["encoder"], sessions["decoder"], reference.images, reference.eps, reference.likelihood)
            quality = quality_record(got, reference, budget)
        except Exception as e:  # onnxruntime's own exception types, e.g. at batch 1000
            report.checks.append(Check("", "quality", False, f"end-to-end run failed: {e}".splitlines()[0]))
    reasons = report.failure_lines()
    if quality is not None and not quality["within_budget"]:
        reasons.append(
            f"quality: mean test -ELBO changed by {quality['neg_elbo_change']:+.4f} nats against fp32 torch; "
            f"the budget is {budget:g}"
        )
    return Verdict("rejected" if reasons else "verified", reasons, report, quality, specs)


def quality_record(got: Scores, reference: Reference, budget: float) -> dict[str, Any]:
    change = got.neg_elbo - reference.scores.neg_elbo
    return {
        "images": int(reference.images.shape[0]),
        "likelihood": reference.likelihood,
        "noise_seed": reference.seed,
        "neg_elbo": got.neg_elbo,
        "neg_elbo_fp32_torch": reference.scores.neg_elbo,
        "neg_elbo_change": change,
        "recon_mse": got.recon_mse,
        "recon_mse_fp32_torch": reference.scores.recon_mse,
        "recon_mse_change": got.recon_mse - reference.scores.recon_mse,
        "budget": budget,
        # NaN (a broken graph) is never within budget
        "within_budget": bool(math.isfinite(change) and abs(change) <= budget),
    }
