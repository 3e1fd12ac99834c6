import gzip
import os

import numpy as np
import pytest
import torch

from helpers import file_hashes, idx_bytes, write_idx, write_idx_set
from vae_dist.data import builtin, splits
from vae_dist.data.builtin import DataError, check_idx, resolve


def write_set(folder, n_train=6, n_test=4, gz=False, fill=None):
    """Four tiny IDX files; pixel values encode the image index so that reads can be checked."""

    def images(n):
        return torch.arange(n).view(n, 1, 1).expand(n, 28, 28) if fill is None else torch.full((n, 28, 28), fill)

    write_idx_set(folder, images(n_train), images(n_test), gz=gz)


@pytest.fixture
def dirs(tmp_path):
    return {k: tmp_path / k for k in ("root", "data", "system")}


def test_flat_gzip_files_are_copied_into_torchvision_layout(dirs):
    write_set(dirs["system"], gz=True)
    root = resolve("fashion-mnist", None, dirs["data"], (dirs["system"],), download=False)
    assert root == dirs["data"]
    assert (dirs["data"] / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    split = splits.load_split("fashion-mnist", True, root)
    assert split.images.dtype == torch.uint8 and split.images.shape == (6, 1, 28, 28)
    assert split.images[:, 0, 0, 0].tolist() == list(range(6))


def test_order_data_then_system(dirs):
    write_set(dirs["data"] / "FashionMNIST" / "raw", fill=2)
    write_set(dirs["system"], fill=3)
    assert resolve("fashion-mnist", None, dirs["data"], (dirs["system"],), download=False) == dirs["data"]


@pytest.mark.parametrize("shared", ["empty", "filled"])
@pytest.mark.parametrize("layout", ["flat-gz", "raw"])
def test_explicit_root_is_read_in_place_and_never_changes_the_data_folder(dirs, shared, layout):
    folder = dirs["root"] if layout == "flat-gz" else dirs["root"] / "FashionMNIST" / "raw"
    write_set(folder, gz=layout == "flat-gz", fill=1)
    if shared == "filled":
        write_set(dirs["data"] / "FashionMNIST" / "raw", fill=2)
    before = file_hashes(dirs["data"])
    root = resolve("fashion-mnist", dirs["root"], dirs["data"], (), download=False)
    assert root == dirs["root"]
    assert builtin.images_file("fashion-mnist", False, root).parent == folder
    split = splits.load_split("fashion-mnist", False, root)
    assert split.images.shape == (4, 1, 28, 28) and int(split.images.max()) == 1  # the root's, not data/'s
    assert file_hashes(dirs["data"]) == before  # nothing copied into the shared folder


def test_explicit_root_without_the_files_is_refused(dirs):
    write_set(dirs["data"] / "FashionMNIST" / "raw")
    (dirs["root"]).mkdir()
    with pytest.raises(DataError, match=f"data.root {dirs['root']} does not hold the Fashion-MNIST IDX files"):
        resolve("fashion-mnist", dirs["root"], dirs["data"], (), download=False)


def test_train_and_test_shapes_must_agree(dirs):
    from vae_dist.config import DataConfig

    write_set(dirs["root"])
    write_idx(dirs["root"] / "t10k-images-idx3-ubyte", torch.zeros(4, 32, 32))
    with pytest.raises(DataError, match=r"training images are \(1, 28, 28\) but the test images are \(1, 32, 32\)"):
        splits.load_splits(DataConfig(root=str(dirs["root"]), download=False))


def test_a_one_dimensional_file_is_not_images(dirs):
    write_set(dirs["root"])
    write_idx(dirs["root"] / "train-images-idx3-ubyte", torch.zeros(50))
    with pytest.raises(DataError, match=r"holds an array of shape \(50,\), not images"):
        root = resolve("fashion-mnist", dirs["root"], dirs["data"], (), download=False)
        splits.load_split("fashion-mnist", True, root)


def test_missing_everywhere_names_every_place(dirs):
    with pytest.raises(DataError) as e:
        resolve("fashion-mnist", None, dirs["data"], (dirs["system"],), download=False)
    msg = str(e.value)
    assert "\n" not in msg
    for d in (dirs["data"], dirs["system"]):
        assert str(d) in msg
    assert "download" in msg and "make data" in msg


def test_truncated_file_is_reported(dirs):
    write_set(dirs["data"] / "FashionMNIST" / "raw")
    f = dirs["data"] / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte is truncated or corrupt"):
        resolve("fashion-mnist", None, dirs["data"], (), download=False)


@pytest.mark.parametrize("blob", [b"", b"\x00\x00\x0d\x03" + b"\x00" * 20, b"\x00\x00\x08\x03\x00"])
def test_corrupt_headers(tmp_path, blob):
    f = tmp_path / "x-idx3-ubyte"
    f.write_bytes(blob)
    with pytest.raises(DataError, match="x-idx3-ubyte"):
        check_idx(f)


def test_corrupt_gzip(tmp_path):
    f = tmp_path / "x-idx3-ubyte.gz"
    f.write_bytes(gzip.compress(idx_bytes(torch.zeros(2, 3, 3)))[:-8])
    with pytest.raises(DataError, match="x-idx3-ubyte.gz"):
        check_idx(f)


def test_epoch_order_is_seeded_and_a_permutation():
    a, b = splits.epoch_order(100, 1, 0), splits.epoch_order(100, 1, 0)
    assert torch.equal(a, b) and sorted(a.tolist()) == list(range(100))
    assert not torch.equal(a, splits.epoch_order(100, 1, 1))
    assert not torch.equal(a, splits.epoch_order(100, 2, 0))


def test_real_fashion_mnist(fashion_root):
    train, test = (splits.load_split("fashion-mnist", t, fashion_root) for t in (True, False))
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and 60 < train.images.float().mean() < 80


def test_rows_read_from_disk_equal_rows_held_in_memory(tmp_path):
    """A split left on disk gives exactly the rows of the same split held in memory, in the order
    asked for (repeats and any order included), and prefetching changes nothing."""
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (50, 3, 5, 7), dtype=np.uint8)
    np.save(tmp_path / "train.npy", array)
    mapped = splits.MappedSplit(tmp_path / "train.npy", 50, (3, 5, 7))
    memory = splits.Split(torch.from_numpy(array))
    lists = [torch.tensor([49, 0, 7, 7, 3]), torch.randperm(50), torch.tensor([], dtype=torch.long)]
    cpu = torch.device("cpu")
    for indices in lists:
        assert torch.equal(mapped.rows(indices, cpu), memory.rows(indices, cpu))
    for a, b in zip(splits.prefetched(mapped, lists, cpu), splits.prefetched(memory, lists, cpu), strict=True):
        assert torch.equal(a, b)
    os.truncate(tmp_path / "train.npy", (tmp_path / "train.npy").stat().st_size - 100)  # cut while open
    with pytest.raises(DataError, match="is shorter than its header says"):
        mapped.rows(torch.tensor([49]), cpu)
    with pytest.raises(DataError, match="train.npy cannot be read"):
        splits.MappedSplit(tmp_path / "train.npy", 50, (3, 5, 7))


@pytest.mark.parametrize("in_memory, limit, kind", [("always", 0, "Split"), ("never", 1e9, "MappedSplit"),
                                                    ("auto", 0.01, "MappedSplit"), ("auto", 1.0, "Split")])
def test_where_a_split_is_read_from(tmp_path, in_memory, limit, kind):
    np.save(tmp_path / "train.npy", np.zeros((20, 1, 28, 28), np.uint8))  # 15.3 KiB
    split = splits.load_prepared(tmp_path, True, 0, in_memory, limit)
    assert type(split).__name__ == kind and len(split) == 20
    assert len(splits.load_prepared(tmp_path, True, 5, in_memory, limit)) == 5
