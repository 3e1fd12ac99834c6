"""The torch-free sampler, run where torch (and everything that needs it) cannot be imported."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from export import sample as sampler
from export.pipeline import export_run
from helpers import NO_TORCH, ROOT, SHAPE, full_disk, make_run, python_without, run_sampler, write_idx
from helpers import run as run_command
from vae_dist import artifacts, runs
from vae_dist.data import splits

SAMPLE_PY = ROOT / "export" / "sample.py"
SCALE = sampler.grid_scale(SHAPE[2])  # the PNGs are upscaled, nearest neighbour
CELL = 28 + sampler.PAD


def test_harness_really_blocks_torch():
    proc = python_without(NO_TORCH, "import torch")
    assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny conv VAE, exported and verified."""
    run = make_run(tmp_path_factory.mktemp("runs"), "conv-tiny", "conv", latent_dim=3)
    result = export_run(run, variants=[])  # the variants' sampling is tested in test_variants.py
    assert result.verified, result.report.failure_lines()
    return run


@pytest.fixture
def onnx_dir(run, tmp_path) -> Path:
    """A private copy of the export folder, free to be damaged."""
    return Path(shutil.copytree(run / "onnx", tmp_path / "onnx"))


def write_png(path: Path, image: np.ndarray) -> Path:
    Image.fromarray(image.astype(np.uint8)).save(path)
    return path


def cells(png: Path, rows: int, cols: int) -> np.ndarray:
    """The grid's cells as uint8 [rows, cols, 28, 28], after checking the grid's size and that
    it is an exact nearest-neighbour upscale."""
    big = np.asarray(Image.open(png))
    assert big.shape == (SCALE * (sampler.PAD + rows * CELL), SCALE * (sampler.PAD + cols * CELL))
    pixels = big[::SCALE, ::SCALE]
    assert np.array_equal(pixels.repeat(SCALE, 0).repeat(SCALE, 1), big)
    return np.stack(
        [
            np.stack([pixels[2 + r * CELL : 2 + r * CELL + 28, 2 + c * CELL : 2 + c * CELL + 28] for c in range(cols)])
            for r in range(rows)
        ]
    )


# ---------------------------------------------------------------- modes, without torch


def test_sample_without_torch_is_byte_identical_for_a_seed(onnx_dir, tmp_path):
    outs = [tmp_path / f"{name}.png" for name in ("a", "b", "c")]
    for out, seed in zip(outs, (7, 7, 8)):
        proc = run_sampler(["sample", "--model-dir", str(onnx_dir), "-n", "6", "--seed", str(seed), "--out", str(out)])
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"wrote {out} (6 samples from the prior, seed {seed})"
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert outs[0].read_bytes() != outs[2].read_bytes()
    grid = cells(outs[0], rows=3, cols=2)  # about sqrt(6) per row
    assert Image.open(outs[0]).mode == "L" and grid.std() > 0


def test_standalone_copy_reconstructs_and_interpolates(run, tmp_path, test_images):
    """The device recipe: sample.py and the onnx folder copied somewhere, nothing else."""
    device = tmp_path / "device"
    device.mkdir()
    shutil.copy(SAMPLE_PY, device / "sample.py")
    shutil.copytree(run / "onnx", device / "onnx")
    write_idx(device / "t10k-images-idx3-ubyte.gz", test_images[:, 0])
    blocked = (*NO_TORCH, "export")
    proc = run_sampler(
        [
            "reconstruct",
            "--model-dir",
            "onnx",
            "--idx",
            "t10k-images-idx3-ubyte.gz",
            "-n",
            "5",
            "--start",
            "2",
            "--per-row",
            "3",
        ],
        cwd=device,
        script=device / "sample.py",
        blocked=blocked,
    )
    assert proc.returncode == 0, proc.stderr
    grid = cells(device / "reconstructions.png", rows=4, cols=3)
    # Rows: originals 2-4, their reconstructions, originals 5-6 (and a blank), theirs.
    assert np.array_equal(grid[0], test_images[2:5, 0]) and np.array_equal(grid[2, :2], test_images[5:7, 0])
    assert not grid[2, 2].any() and not grid[3, 2].any()

    write_png(device / "a.png", test_images[0, 0])
    write_png(device / "b.png", test_images[1, 0])
    proc = run_sampler(
        ["interpolate", "--model-dir", "onnx", "a.png", "b.png", "--steps", "4"],
        cwd=device,
        script=device / "sample.py",
        blocked=blocked,
    )
    assert proc.returncode == 0, proc.stderr
    grid = cells(device / "interpolation.png", rows=1, cols=6)
    assert np.array_equal(grid[0, 0], test_images[0, 0]) and np.array_equal(grid[0, 5], test_images[1, 0])


def test_reconstructions_match_torch(run, tmp_path, test_images):
    idx = write_idx(tmp_path / "test.idx", test_images[:, 0])
    out = tmp_path / "r.png"
    args = ["reconstruct", "--model-dir", str(run / "onnx"), "--idx", str(idx), "-n", "4", "--out", str(out)]
    assert sampler.main(args) == 0
    model, _ = artifacts.load_model(run / runs.MODEL_FILE)
    with torch.no_grad():
        mu, _ = model.encode(splits.to_float(torch.from_numpy(test_images[:4])))
        want = (torch.sigmoid(model.decode(mu)) * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()[:, 0]
    got = cells(out, rows=2, cols=4)[1]
    assert np.abs(got.astype(int) - want).max() <= 1  # float32 rounding may flip one grey level


def test_default_model_dir_is_the_newest_verified_export(run, tmp_path):
    shutil.copytree(run / "onnx", tmp_path / "runs" / "conv-tiny" / "onnx")
    proc = run_sampler(["sample", "-n", "1", "--seed", "0"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    folder = Path("runs/conv-tiny/onnx")
    assert proc.stderr.strip() == f"no --model-dir given: using {folder}, the newest verified export under runs/"
    assert (tmp_path / "samples.png").is_file()
    # A run directory is accepted in place of its onnx folder.
    proc = run_sampler(["sample", "-n", "1", "--model-dir", "runs/conv-tiny", "--out", "x.png"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # Another folder of runs.
    shutil.move(tmp_path / "runs", tmp_path / "elsewhere")
    proc = run_sampler(["sample", "-n", "1", "--runs", "elsewhere", "--out", "y.png"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().startswith(f"no --model-dir given: using {Path('elsewhere/conv-tiny/onnx')}, the newest")
    proc = run_sampler(["sample", "-n", "1", "--out", "z.png"], cwd=tmp_path)
    assert proc.returncode == 2 and "no verified export under runs/" in proc.stderr


# ---------------------------------------------------------------- errors


def _edit_manifest(folder: Path, **changes) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def _retouch(path: Path) -> None:
    """A valid ONNX file with different bytes than the verified one."""
    model = onnx.load(str(path))
    model.doc_string += " (edited)"
    onnx.save(model, str(path))


ERRORS = {
    "missing file": (lambda d, t: ["sample", "--decoder", str(d / "nope.onnx")], "nope.onnx: no such file"),
    "missing folder": (lambda d, t: ["sample", "--model-dir", str(t / "nowhere")], "no such folder"),
    "not onnx": (lambda d, t: ["sample", "--decoder", str(_garbage(d))], "is not an ONNX model onnxruntime can load"),
    "swapped": (
        lambda d, t: [
            "reconstruct",
            "--encoder",
            str(d / "decoder.onnx"),
            "--decoder",
            str(d / "encoder.onnx"),
            "x.png",
        ],
        "is the decoder of a VAE, but is used as the encoder; are --encoder and --decoder swapped?",
    ),
    "halves of two models": (
        lambda d, t: [
            "reconstruct",
            "--encoder",
            str(_other_export(d, t) / "encoder.onnx"),
            "--decoder",
            str(d / "decoder.onnx"),
            "x.png",
        ],
        "were exported from different models",
    ),
    "n zero": (
        lambda d, t: ["sample", "--model-dir", str(d), "-n", "0"],
        "argument -n/--num: must be at least 1, got 0",
    ),
    "n negative": (lambda d, t: ["reconstruct", "--model-dir", str(d), "-n", "-3"], "must be at least 1, got -3"),
    "steps": (lambda d, t: ["interpolate", "--model-dir", str(d), "--steps", "1"], "must be at least 2"),
    "png size": (
        lambda d, t: ["reconstruct", "--model-dir", str(d), str(write_png(t / "big.png", np.zeros((32, 32))))],
        "big.png is 32x32 pixels; the model takes 28x28",
    ),
    "idx size": (
        lambda d, t: [
            "reconstruct",
            "--model-dir",
            str(d),
            "--idx",
            str(write_idx(t / "big.idx.gz", np.zeros((3, 32, 32)))),
        ],
        "holds images of shape [1, 32, 32]; the model takes [1, 28, 28]",
    ),
    "not an image": (
        lambda d, t: ["reconstruct", "--model-dir", str(d), str(_garbage(t, "x.png"))],
        "is not a readable image",
    ),
    "not idx": (
        lambda d, t: ["reconstruct", "--model-dir", str(d), "--idx", str(_garbage(t, "x.idx"))],
        "is not an IDX file",
    ),
    "two images needed": (
        lambda d, t: ["interpolate", "--model-dir", str(d), str(write_png(t / "a.png", np.zeros((28, 28))))],
        "interpolate takes exactly two images, got 1",
    ),
    "unverified": (
        lambda d, t: (_edit_manifest(d, verified=False), ["sample", "--model-dir", str(d)])[1],
        "did not pass verification (manifest: verified=False); refusing to use it",
    ),
    "changed after verification": (
        lambda d, t: (_retouch(d / "decoder.onnx"), ["sample", "--model-dir", str(d)])[1],
        "is not the file that was verified",
    ),
    "damaged after verification": (
        lambda d, t: (_truncate(d / "decoder.onnx"), ["sample", "--model-dir", str(d)])[1],
        "decoder.onnx is not the file that was verified (sha256 differs",
    ),
    "manifest not JSON": (
        lambda d, t: ((d / "manifest.json").write_text("{"), ["sample", "--model-dir", str(d)])[1],
        "manifest.json is not valid JSON; verify or export the run again",
    ),
    "not listed in the manifest": (
        lambda d, t: ["sample", "--decoder", str(shutil.copy(d / "decoder.onnx", d / "mine.onnx"))],
        "mine.onnx is not listed in",
    ),
    "no such variant": (
        lambda d, t: ["sample", "--model-dir", str(d), "--variant", "fp16"],
        "has no fp16 variant (it has: none); export the run again to make it",
    ),
    "bad option": (lambda d, t: ["sample", "--model-dir", str(d), "--colour"], "unrecognized arguments: --colour"),
    "no manifest": (
        lambda d, t: ((d / "manifest.json").unlink(), ["sample", "--model-dir", str(d)])[1],
        "holds no verified export (no manifest.json); export the run first",
    ),
    "manifest not beside an explicit file": (
        lambda d, t: ((d / "manifest.json").unlink(), ["sample", "--decoder", str(d / "decoder.onnx")])[1],
        "no manifest.json beside",
    ),
    "a run without an export": (
        lambda d, t: (make_run(t, "unexported", "linear"), ["sample", "--model-dir", str(t / "unexported")])[1],
        "unexported holds no verified export (no manifest.json); export the run first (vae-dist export RUN)",
    ),
}


def _other_export(folder: Path, tmp: Path) -> Path:
    """A copy of the export that claims to come from another model file."""
    other = Path(shutil.copytree(folder, tmp / "other"))
    _edit_manifest(other, source={"file": "model.safetensors", "sha256": "0" * 64})
    return other


def _garbage(folder: Path, name: str = "decoder.onnx") -> Path:
    folder = folder / "garbage"
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(b"this is not what it claims to be\n" * 10)
    return folder / name


# An export that is there but not vouched for by its manifest: vae-dist's "verification failed".
# Every other case is a mistake in what was given: exit status 2, as vae-dist has it.
UNVERIFIED = {
    "unverified",
    "changed after verification",
    "damaged after verification",
    "manifest not JSON",
    "not listed in the manifest",
}


@pytest.mark.parametrize("case", ERRORS)
def test_errors_are_one_line_without_traceback(case, onnx_dir, tmp_path):
    make_args, message = ERRORS[case]
    args = make_args(onnx_dir, tmp_path)
    proc = run_sampler([*args, "--out", str(tmp_path / "out.png")] if "--out" not in args else args, cwd=tmp_path)
    assert proc.returncode == (sampler.EXIT_UNVERIFIED if case in UNVERIFIED else sampler.EXIT_USAGE), proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert lines[0].startswith("sample.py") and ": error: " in lines[0]
    assert not (tmp_path / "out.png").exists()


def test_exit_status_convention():
    assert (sampler.EXIT_UNVERIFIED, sampler.EXIT_USAGE, sampler.EXIT_INTERRUPTED) == (1, 2, 130)
    assert issubclass(sampler.UnverifiedError, sampler.SampleError)
    assert sampler.UnverifiedError.status == 1 and sampler.SampleError.status == 2


def test_an_interrupt_is_one_line_and_exit_status_130(onnx_dir, tmp_path, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sampler, "cmd_sample", interrupted)
    assert sampler.main(["sample", "--model-dir", str(onnx_dir), "--out", str(tmp_path / "s.png")]) == 130
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.endswith(": interrupted")  # after the program's name


def test_a_full_disk_leaves_no_partial_png_and_the_earlier_one_as_it_was(onnx_dir, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "samples.png"
    out.write_bytes(sampler.PNG_SIGNATURE + b"an earlier result")  # a PNG: the sampler may replace it
    with full_disk(folder, free_bytes=1000) as (preexec_fn, _):
        cmd = [sys.executable, "-m", "export.sample", "sample", "--model-dir", str(onnx_dir), "-n", "400"]
        proc = run_command([*cmd, "--out", str(out)], check=False, preexec_fn=preexec_fn)
    assert proc.returncode == sampler.EXIT_USAGE, proc.stderr
    reasons = (os.strerror(errno.ENOSPC), os.strerror(errno.EFBIG))
    assert proc.stderr.strip().splitlines() in ([f"sample.py: error: cannot write {out} ({r})"] for r in reasons)
    assert out.read_bytes() == sampler.PNG_SIGNATURE + b"an earlier result"
    assert list(folder.iterdir()) == [out]


def _images_of_every_kind():
    from PIL import Image

    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8), "RGB")
    rgba = Image.fromarray(rng.integers(0, 256, (40, 30, 4), dtype=np.uint8), "RGBA")
    grey = Image.fromarray(rng.integers(0, 256, (21, 64), dtype=np.uint8), "L")
    sixteen = Image.fromarray(rng.integers(0, 65536, (33, 17), dtype=np.uint16))
    palette = rgb.convert("P")
    palette.info["transparency"] = 3
    return {"rgb": rgb, "rgba": rgba, "grey": grey, "16-bit": sixteen, "palette": palette}


@pytest.mark.parametrize("policy", ["crop", "pad", "stretch"])
@pytest.mark.parametrize("channels", [1, 3])
def test_the_sampler_fits_an_image_exactly_as_prepare_does(policy, channels):
    """export/sample.py repeats vae_dist.data.images' conversion (it may not import the project):
    the same pixels for every kind of image, size and policy."""
    from export.sample import fit_pixels
    from vae_dist.data.images import Fit, fit_image

    for size in ((16, 16), (24, 12)):
        fit = Fit(*size, channels, policy)
        for name, image in _images_of_every_kind().items():
            ours = fit_pixels(image, fit.to_dict())
            assert np.array_equal(ours, fit_image(image, fit)), (name, size, policy, channels)
            assert ours.shape == (channels, *size)


def test_int8_products_are_summed_exactly(tmp_path):
    """The sampler's (and the export checks') sessions run int8 kernels without the 16-bit pair
    sums that saturate on x86 AVX2: 255 x 127 summed over 64 products is 2,072,640 (the default
    kernels give 1,048,544 on such a CPU)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k = 64
    weights = numpy_helper.from_array(np.full((k, 8), 127, np.int8), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])],
        "int8",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [None, k])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [None, 8])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    options = sampler.session_options(1)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    out = session.run(None, {"A": np.full((4, k), 255, np.uint8)})[0]
    assert (out == 255 * 127 * k).all()
