"""`vae-dist prepare`: small folders written here (odd sizes, RGBA, palette, grey, 16-bit, a
truncated PNG, a text file named .jpg, nested folders, duplicates), each conversion checked by
its pixels, and every refusal in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from helpers import flip_byte
from vae_dist.data import prepare as prep
from vae_dist.data.images import Fit, fit_image
from vae_dist.data.prepare import prepare
from vae_dist.data.prepared import PrepareError, read_info


def solid(mode: str, size: tuple[int, int], colour) -> Image.Image:
    return Image.new(mode, size, colour)


def gradient(width: int, height: int, seed: int) -> Image.Image:
    """A colour image that differs from every other seed's."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def folder_of(tmp_path, count: int = 10, size=(8, 8), name="src"):
    src = tmp_path / name
    src.mkdir()
    for i in range(count):
        gradient(*size, seed=i).save(src / f"{i:02d}.png")
    return src


def arrays(out):
    return {s: np.load(out / f"{s}.npy") for s in ("train", "test")}


# ---------------------------------------------------------------- the conversion, pixel by pixel


def test_rgba_is_composited_over_white():
    image = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    image.putpixel((1, 0), (255, 0, 0, 128))
    row = fit_image(image, Fit(1, 2, 3, "stretch"))
    assert row.shape == (3, 1, 2)
    assert row[:, 0, 0].tolist() == [255, 255, 255]  # fully transparent: the background
    assert row[:, 0, 1].tolist() == [255, 127, 127]  # half red over white


def test_palette_with_transparency_and_grey_and_16_bit():
    palette = Image.new("P", (1, 1), 0)
    palette.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    assert fit_image(palette, Fit(1, 1, 3, "stretch"))[:, 0, 0].tolist() == [10, 20, 30]
    palette.info["transparency"] = 0
    assert fit_image(palette, Fit(1, 1, 3, "stretch"))[:, 0, 0].tolist() == [255, 255, 255]
    assert fit_image(solid("L", (1, 1), 77), Fit(1, 1, 1, "stretch")).tolist() == [[[77]]]
    sixteen = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    assert fit_image(sixteen, Fit(1, 3, 1, "stretch")).tolist() == [[[0, 100, 255]]]
    # RGB to grey is PIL's ITU-R 601-2 luma
    assert fit_image(solid("RGB", (1, 1), (255, 0, 0)), Fit(1, 1, 1, "stretch")).tolist() == [[[76]]]


def test_crop_pad_and_stretch_fit_an_odd_size():
    # 6 wide, 2 high: left third black, middle white, right third black
    image = Image.fromarray(np.array([[0, 0, 255, 255, 0, 0]] * 2, dtype=np.uint8), "L")
    crop = fit_image(image, Fit(2, 2, 1, "crop"))  # the centred 2x2: white
    assert crop.shape == (1, 2, 2) and (crop == 255).all()
    pad = fit_image(image, Fit(6, 6, 1, "pad"))  # the 6x2 image centred, white above and below
    assert (pad[0, :2] == 255).all() and (pad[0, 4:] == 255).all() and pad[0, 2, 0] == 0
    stretch = fit_image(image, Fit(3, 3, 1, "stretch"))
    assert stretch.shape == (1, 3, 3) and stretch[0, 1, 1] > 200 and stretch[0, 1, 0] < 60


def test_resizing_is_antialiased():
    # a fine checkerboard shrunk by 4 averages to grey instead of aliasing to black or white
    board = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    row = fit_image(Image.fromarray(board, "L"), Fit(16, 16, 1, "stretch"))
    assert 100 < row.mean() < 155 and row.std() < 20


# ---------------------------------------------------------------- a folder


def test_a_mixed_folder_is_prepared_and_described(tmp_path):
    src = tmp_path / "src"
    (src / "nested" / "deeper").mkdir(parents=True)
    for i in range(8):
        gradient(12, 10, seed=i).save(src / f"rgb{i}.png")
    gradient(12, 10, seed=20).save(src / "nested" / "photo.jpg", quality=95)
    gradient(12, 10, seed=21).convert("RGBA").save(src / "nested" / "deeper" / "alpha.webp", lossless=True)
    gradient(12, 10, seed=22).save(src / "bitmap.bmp")
    frames = [gradient(12, 10, seed=23).convert("P"), gradient(12, 10, seed=24).convert("P")]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:])
    gradient(12, 10, seed=0).save(src / "nested" / "copy-of-rgb0.png")  # an exact duplicate
    good = src / "rgb1.png"
    (src / "truncated.png").write_bytes(good.read_bytes()[:-40])
    (src / "notes.jpg").write_text("not a picture")
    (src / "README.txt").write_text("hello")

    result = prepare(str(src), tmp_path / "out", test_fraction=0.25, seed=3, workers=2)
    out, info = result.out, result.info
    data = arrays(out)
    assert info["shape"] == [3, 10, 12] and info["fit"] == {
        "size": [10, 12], "channels": 3, "fit": "crop", "background": 255
    }
    assert info["duplicates"] == 1
    assert info["counts"] == {"train": 9, "test": 3} and data["train"].shape == (9, 3, 10, 12)
    skipped = {s["path"]: s["reason"] for s in info["skipped"]}
    assert set(skipped) == {"truncated.png", "notes.jpg", "README.txt"}
    assert "truncated" in skipped["truncated.png"] and "Pillow" in skipped["notes.jpg"]
    # no image is in both splits, and every stored row is one of the readable files, converted
    rows = {r.tobytes() for r in data["train"]}
    assert not rows & {r.tobytes() for r in data["test"]}
    fit = Fit(10, 12, 3, "crop")
    expected = fit_image(Image.open(src / "nested" / "deeper" / "alpha.webp"), fit)
    assert expected.tobytes() in rows | {r.tobytes() for r in data["test"]}
    assert read_info(out) == info and json.loads((out / "dataset.json").read_text()) == info
    assert "prepared" in result.summary() and "3 file(s) skipped" in result.summary()
    # the same seed gives the same bytes; another seed another split
    again = prepare(str(src), tmp_path / "again", test_fraction=0.25, seed=3, workers=1)
    assert again.info["files"] == info["files"]
    other = prepare(str(src), tmp_path / "other", test_fraction=0.25, seed=4, workers=1)
    assert other.info["files"]["test.npy"]["sha256"] != info["files"]["test.npy"]["sha256"]


def test_grey_images_make_one_channel_and_sizes_must_agree_unless_given(tmp_path):
    src = tmp_path / "grey"
    src.mkdir()
    for i in range(5):
        Image.fromarray(np.full((7, 9), i * 40, np.uint8), "L").save(src / f"{i}.png")
    Image.fromarray(np.full((5, 5), 200, np.uint8), "L").save(src / "small.png")
    with pytest.raises(PrepareError, match=r"2 different sizes \(5x5, 7x9, ...\); give --size"):
        prepare(str(src), tmp_path / "out")
    info = prepare(str(src), tmp_path / "out", size=(4, 4), test_fraction=0.5).info
    assert info["shape"] == [1, 4, 4]


def test_a_given_test_folder_keeps_its_images_and_drops_their_copies_from_train(tmp_path):
    train = folder_of(tmp_path, 6, name="train")
    test = tmp_path / "test"
    test.mkdir()
    gradient(8, 8, seed=2).save(test / "same-as-train-2.png")
    gradient(8, 8, seed=99).save(test / "new.png")
    info = prepare(str(train), tmp_path / "out", test_source=str(test)).info
    assert info["counts"] == {"train": 5, "test": 2} and info["duplicates"] == 1
    assert info["split"]["how"] == "given"


def test_an_existing_output_is_refused_and_force_replaces_it_whole(tmp_path):
    src = folder_of(tmp_path)
    out = tmp_path / "out"
    first = prepare(str(src), out, test_fraction=0.2)
    before = (out / "train.npy").read_bytes()
    with pytest.raises(PrepareError, match="already exists; pass --force"):
        prepare(str(src), out, test_fraction=0.5)
    assert (out / "train.npy").read_bytes() == before
    second = prepare(str(src), out, test_fraction=0.5, force=True)
    assert second.info["counts"] != first.info["counts"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary folder left


def test_the_built_in_data_set_is_prepared_as_published(tmp_path, fashion_root):
    info = prepare("fashion-mnist", tmp_path / "fm").info
    assert info["shape"] == [1, 28, 28] and info["counts"] == {"train": 60000, "test": 10000}
    assert info["fit"] is None and info["split"] == {"how": "the data set's own"}
    from vae_dist.data import splits

    test = np.load(tmp_path / "fm" / "test.npy", mmap_mode="r")
    assert np.array_equal(test[:50], splits.load_split("fashion-mnist", False, fashion_root, 50).images.numpy())


# ---------------------------------------------------------------- reading one back, and refusals


def test_read_info_refuses_what_is_not_a_complete_prepared_dataset(tmp_path):
    src = folder_of(tmp_path)
    out = prepare(str(src), tmp_path / "out", test_fraction=0.2).out
    with pytest.raises(PrepareError, match="is not a prepared dataset"):
        read_info(src)
    train = out / "train.npy"
    blob = train.read_bytes()
    train.write_bytes(blob[: len(blob) - 10])
    with pytest.raises(PrepareError, match="train.npy cannot be read"):
        read_info(out)
    train.write_bytes(blob)
    info = json.loads((out / "dataset.json").read_text())
    (out / "dataset.json").write_text(json.dumps({**info, "shape": [3, 8, 9]}))
    with pytest.raises(PrepareError, match=r"but dataset.json says uint8 \(8, 3, 8, 9\)"):
        read_info(out)
    (out / "dataset.json").write_text(json.dumps(info))
    flip_byte(train, -1)
    read_info(out)  # sizes and headers agree: only the checksum finds it
    with pytest.raises(PrepareError, match="does not match its sha256"):
        prep.check(out)


@pytest.mark.parametrize(
    "args, message",
    [
        (["nowhere", "--out", "o"], "SOURCE 'nowhere' is not a folder"),
        (["empty", "--out", "o"], "SOURCE empty holds no PNG, JPEG, WebP, BMP or GIF file"),
        (["junk", "--out", "o"], "no image in junk could be read (1 tried)"),
        (["src", "--out", "o", "--size", "0"], "--size '0': give a positive size"),
        (["src", "--out", "o", "--size", "8x"], "--size '8x': give a positive size"),
        (["src", "--out", "o", "--channels", "2"], "--channels must be 1 (grey) or 3 (RGB), got 2"),
        (["src", "--out", "o", "--test-fraction", "1"], "--test-fraction must be between 0 and 1"),
        (["src", "--out", "src"], "src already exists; pass --force"),
        (["src", "--out", "src", "--force"], "src is not a prepared dataset (no dataset.json); --force replaces only"),
        (["src"], "give SOURCE and --out DIR"),
        (["--check", "src"], "src is not a prepared dataset"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, args, message):
    from vae_dist.data.prepare import prepare_command

    folder_of(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_text("text")
    monkeypatch.chdir(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(prepare_command, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [lines[-1]] and lines[-1].startswith("error: ") and message in lines[-1], result.output
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


# ---------------------------------------------------------------- training and export on one


def test_training_and_export_on_a_prepared_colour_folder(tmp_path):
    """A folder of colour images, prepared, trained on by both models through data.path, then
    exported and verified against its own test split (found from the model file alone)."""
    from helpers import VAE_DIST, run
    from vae_dist.config import load_config
    from vae_dist.record import read as read_record
    from vae_dist.training import train

    src = tmp_path / "pictures"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(80):  # blobs of one colour on white, at random places: learnable, all distinct
        pixels = np.full((20, 20, 3), 255, np.uint8)
        y, x = rng.integers(0, 12, 2)
        pixels[y : y + 8, x : x + 8] = rng.integers(0, 256, 3)
        Image.fromarray(pixels).save(src / f"{i:03d}.png")
    dataset = prepare(str(src), tmp_path / "ds", size=(16, 16), test_fraction=0.2).out
    for kind in ("linear", "conv"):
        cfg = load_config(
            kind,
            [f"data.path={dataset}", "train.epochs=2", "train.batch_size=16", "model.latent_dim=4",
             "model.hidden_dims=[32]", "model.channels=[8,16]", "train.eval_batch_size=16",
             f"run.output_dir={tmp_path / 'runs'}", f"run.name={kind}"],
        )
        result = train(cfg, cpu=True)
        record = read_record(result.run_dir / "model.safetensors")
        assert record.image_shape == (3, 16, 16) and record.dataset == str(dataset)
        assert record.test_images == 16 and np.isfinite(result.metrics["test_neg_elbo"])
        assert record.fit == {"size": [16, 16], "channels": 3, "fit": "crop", "background": 255}
        grid = Image.open(result.run_dir / "images" / "reconstruction_epoch001.png")
        assert grid.mode == "RGB"
    out = run([VAE_DIST, "export", str(tmp_path / "runs" / "conv"), "--variants", "none"])
    assert "verified" in out.stdout.strip().splitlines()[-1]
    assert "on all 16 test images" in out.stdout, out.stdout
    # the sampler (onnxruntime alone) takes a photo of any size and fits it as prepare did
    from helpers import run_sampler

    Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg")
    onnx_dir = tmp_path / "runs" / "conv" / "onnx"
    out = run_sampler(["reconstruct", "--model-dir", str(onnx_dir), str(tmp_path / "photo.jpg"),
                       "--out", str(tmp_path / "rec.png"), "--scale", "1"])
    assert out.returncode == 0, out.stderr
    assert Image.open(tmp_path / "rec.png").size == (2 + 1 * 18, 2 + 2 * 18)  # one 16x16 cell, 2 px borders


def test_a_data_path_that_is_not_a_prepared_dataset_is_one_line(tmp_path):
    from vae_dist.config import load_config
    from vae_dist.training import train

    cfg = load_config("linear", [f"data.path={tmp_path}", f"run.output_dir={tmp_path / 'runs'}", "run.name=r"])
    with pytest.raises(PrepareError, match="is not a prepared dataset .no dataset.json.; make one with"):
        train(cfg, cpu=True)
    assert not (tmp_path / "runs").exists()


def _peak_rss_anon(cmd, cwd) -> tuple[int, int]:
    """Run `cmd`; its exit status and the peak of its anonymous resident memory (RssAnon), in MiB."""
    import subprocess
    import time

    from helpers import start

    proc = start(cmd, cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        try:
            status = open(f"/proc/{proc.pid}/status").read()
            peak = max(peak, int(status.split("RssAnon:")[1].split()[0]) // 1024)
        except (OSError, IndexError):
            pass
        time.sleep(0.01)
    assert proc.returncode == 0, proc.stderr.read()[-3000:]
    return proc.returncode, peak


@pytest.mark.slow
def test_a_dataset_larger_than_the_memory_limit_trains_within_it(tmp_path):
    """A 300 MB training split with data.memory_limit_mb=64: it is read from disk batch by batch,
    and the process's anonymous memory stays below what the same training on a tiny dataset takes
    plus the limit; held in memory (data.in_memory=always), it does not."""
    from helpers import VAE_DIST, set_options

    rng = np.random.default_rng(0)
    shape = (3, 64, 64)  # 12 KiB per image
    big = prep.from_arrays(tmp_path / "big", rng.integers(0, 256, (25_000, *shape), dtype=np.uint8),
                           rng.integers(0, 256, (500, *shape), dtype=np.uint8)).out
    small = prep.from_arrays(tmp_path / "small", rng.integers(0, 256, (1_000, *shape), dtype=np.uint8),
                             rng.integers(0, 256, (500, *shape), dtype=np.uint8)).out
    assert (big / "train.npy").stat().st_size > 290 * 2**20

    def train_on(folder, name, reading, epochs=1):
        return _peak_rss_anon(
            [VAE_DIST, "train", "--config", "linear", "--output-dir", str(tmp_path / "runs"), "--name", name,
             *set_options([f"data.path={folder}", "data.memory_limit_mb=64", f"data.in_memory={reading}",
                           "model.hidden_dims=[16]", "model.latent_dim=2", f"train.epochs={epochs}",
                           "train.batch_size=500", "train.eval_batch_size=500", "train.grid_samples=4"])],
            tmp_path,
        )[1]

    baseline = train_on(small, "small", "never", epochs=25)  # the same 50 steps, on a 12 MB dataset
    on_disk = train_on(big, "big", "auto")
    in_memory = train_on(big, "big-in-memory", "always")
    print(f"peak RssAnon: tiny dataset {baseline} MiB, 300 MB from disk {on_disk} MiB, in memory {in_memory} MiB")
    assert on_disk <= baseline + 64
    assert in_memory >= on_disk + 200  # the same run holding the 293 MiB split: the measure sees it


def test_the_real_colour_set_is_prepared(tmp_path, emoji_dir):
    """Twemoji's PNGs (RGBA and palette images, 64x64): every file read, transparency over white."""
    from helpers import EMOJI_FILES, EMOJI_TRAIN

    result = prepare(str(emoji_dir), tmp_path / "emoji", workers=2)
    info = result.info
    assert info["shape"] == [3, 64, 64] and info["skipped"] == []
    assert info["counts"]["train"] + info["counts"]["test"] + info["duplicates"] == EMOJI_FILES
    assert info["counts"]["test"] == round(0.1 * (EMOJI_FILES - info["duplicates"]))
    assert info["counts"]["train"] == EMOJI_TRAIN
    test = np.load(tmp_path / "emoji" / "test.npy", mmap_mode="r")
    assert (test[:, :, 0, 0] == 255).all(axis=1).mean() > 0.5  # most corners are transparent: white
    assert 100 < test.mean() < 230


def test_the_shipped_colour_cnn_trains_on_the_real_colour_set(tmp_path, emoji_dir):
    """conv64.yaml on 256 emoji for one epoch, then exported and verified on its 3x64x64 test split,
    and one of its PNGs reconstructed by the sampler (onnxruntime alone)."""
    from helpers import VAE_DIST, run, run_sampler, tiny_overrides
    from vae_dist.config import load_config
    from vae_dist.training import train

    dataset = prepare(str(emoji_dir), tmp_path / "emoji", workers=2).out
    overrides = [f"data.path={dataset}", *tiny_overrides(batch_size=None)]  # conv64's own batch size
    cfg = load_config("conv64", [*overrides, f"run.output_dir={tmp_path / 'runs'}", "run.name=r"])
    result = train(cfg, cpu=True)
    assert result.model.image_shape == (3, 64, 64) and result.model.latent_dim == 128
    assert 0 < result.metrics["test_neg_elbo"] < 12288 * 0.7  # far below the 8517 nats of predicting 0.5
    grid = Image.open(result.run_dir / "images" / "reconstruction_epoch000.png")
    assert grid.mode == "RGB" and grid.width >= 8 * 64

    out = run([VAE_DIST, "export", str(result.run_dir), "--variants", "none"])
    assert out.stdout.strip().splitlines()[-1].endswith("onnx: verified"), out.stdout
    assert "on the first 64 test images only (data.test_subset)" in out.stdout, out.stdout
    png = sorted(emoji_dir.glob("*.png"))[0]
    onnx_dir = result.run_dir / "onnx"
    proc = run_sampler(["reconstruct", "--model-dir", str(onnx_dir), str(png), "--out", str(tmp_path / "rec.png"),
                        "--scale", "1"])
    assert proc.returncode == 0, proc.stderr
    cells = np.asarray(Image.open(tmp_path / "rec.png"))
    assert cells.shape == (2 + 2 * 66, 2 + 66, 3)
    # the top cell is the PNG as prepare fits it; the bottom one, the model's reconstruction of it
    x = fit_image(Image.open(png), Fit(64, 64, 3, "crop"))
    assert np.array_equal(cells[2:66, 2:66], x.transpose(1, 2, 0))
    assert cells[68:132, 2:66].std() > 1  # a decoded image, not a blank cell
