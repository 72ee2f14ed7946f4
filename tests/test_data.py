"""Loaders against the real shared files, the download path against a local server, corrupt files."""

from __future__ import annotations

import functools
import gzip
import http.server
import io
import shutil
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from pdprune.data import DataError, batches, load_dataset
from pdprune.data import files as files_module
from pdprune.data import idx as idx_module
from pdprune.data import sst2 as sst2_module
from pdprune.data.augment import random_crop_flip
from pdprune.data.cifar10 import _from_tarball
from pdprune.data.files import download


def test_mnist_and_fashion_mnist(data_dir):
    for name in ("mnist", "fashion_mnist"):
        data = load_dataset(name, data_dir)
        assert data.train_inputs.shape == (60_000, 1, 28, 28)
        x, y = data.evaluations["test"]
        assert x.shape == (10_000, 1, 28, 28) and y.shape == (10_000,)
        assert abs(float(data.train_inputs.mean())) < 0.01 and abs(float(data.train_inputs.std()) - 1) < 0.01
    fashion = load_dataset("fashion_mnist", data_dir)
    assert torch.bincount(fashion.train_labels).tolist() == [6000] * 10
    assert torch.bincount(fashion.evaluations["test"][1]).tolist() == [1000] * 10


def test_cifar10_follows_the_shared_evaluation_split(data_dir):
    data = load_dataset("cifar10", data_dir)
    assert data.train_inputs.shape == (45_000, 3, 32, 32)
    assert list(data.evaluations) == ["held_out_train_45000_49999", "test_exact_0_999"]
    held_out, test = data.evaluations.values()
    assert held_out[0].shape == (5_000, 3, 32, 32) and test[0].shape == (1_000, 3, 32, 32)
    all_labels = torch.cat([data.train_labels, held_out[1]])
    assert torch.bincount(all_labels).tolist() == [5000] * 10
    assert data.augment is not None


def test_sst2_with_our_tokenizer(data_dir):
    data = load_dataset("sst2", data_dir)
    assert data.train_inputs.shape == (67_349, 64) and data.evaluations["dev"][0].shape == (872, 64)
    assert data.vocabulary[:2] == ("<pad>", "<unk>") and len(data.vocabulary) > 10_000
    assert set(data.train_labels.unique().tolist()) == {0, 1}


def test_digits_need_no_data_directory(monkeypatch):
    monkeypatch.delenv("PDPRUNE_DATA", raising=False)
    assert load_dataset("digits").train_inputs.shape == (1438, 1, 8, 8)
    with pytest.raises(ValueError, match=r"dataset 'mnist' needs a data directory"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'; choose one of"):
        load_dataset("imagenet")


def _copy(data_dir: Path, tmp_path: Path, relative: str) -> Path:
    target = tmp_path / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(data_dir / relative, target)
    return target


def test_truncated_gzip_fails_its_checksum_naming_the_file(data_dir, tmp_path):
    for name in idx_module.FILES:
        _copy(data_dir, tmp_path, f"mnist/{name}")
    path = tmp_path / "mnist/t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz does not match its published sha256.*truncated or corrupt"):
        load_dataset("mnist", tmp_path)


def test_idx_reader_rejects_truncated_contents(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x0a" + bytes(5)))
    with pytest.raises(DataError, match=r"holds 5 bytes for a shape \(10,\); it is truncated"):
        idx_module.read_idx(path)


def test_missing_cifar_file_says_where_and_how(tmp_path):
    with pytest.raises(DataError, match=r"cifar-10-python.tar.gz is missing; set PDPRUNE_DATA .* or pass download=True"):
        load_dataset("cifar10", tmp_path)


def test_corrupt_webp_is_caught_by_its_checksum(data_dir, tmp_path):
    for name in ["train_labels.txt", "test_exact_00.webp", "test_exact_labels.txt"] + [f"train_{i:02d}.webp" for i in range(50)]:
        (tmp_path / "cifar10").mkdir(exist_ok=True)
        (tmp_path / "cifar10" / name).symlink_to(data_dir / "cifar10" / name)
    (tmp_path / "cifar10" / "train_07.webp").unlink()
    corrupted = bytearray((data_dir / "cifar10" / "train_07.webp").read_bytes())
    corrupted[5000] ^= 0xFF
    (tmp_path / "cifar10" / "train_07.webp").write_bytes(bytes(corrupted))
    with pytest.raises(DataError, match=r"train_07.webp does not match its published sha256"):
        load_dataset("cifar10", tmp_path)


def test_cifar_tarball_reader_reads_the_official_layout(tmp_path):
    import pickle
    import tarfile

    def batch(count, offset):
        return {b"data": (torch.arange(count * 3072) % 251).to(torch.uint8).reshape(count, 3072).numpy(), b"labels": [(i + offset) % 10 for i in range(count)]}

    path = tmp_path / "cifar.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            payload = pickle.dumps(batch(4, len(name)))
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    data = _from_tarball(path)
    assert data.train_inputs.shape == (20, 3, 32, 32) and data.evaluations["test"][0].shape == (4, 3, 32, 32)
    assert data.train_labels[:4].tolist() == [2, 3, 4, 5]


# --- Download path against a local HTTP server ------------------------------------------------------


class _Server:
    """Serves `root` on 127.0.0.1; `failures` makes the first requests for a path fail."""

    def __init__(self, root: Path) -> None:
        self.failures: dict[str, int] = {}
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                if outer.failures.get(self.path, 0) > 0:
                    outer.failures[self.path] -= 1
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    self.wfile.write(b"partial")  # then hang up: a truncated transfer
                    return
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()


def test_mnist_downloads_verifies_and_loads(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(files_module, "BACKOFF_SECONDS", 0.0)  # the retries happen, without the waits
    served = tmp_path / "server"
    for name in idx_module.FILES:
        _copy(data_dir, served, f"mnist/{name}")
    with _Server(served / "mnist") as server:
        monkeypatch.setitem(idx_module.MIRRORS, "mnist", ["http://127.0.0.1:9/unreachable/", server.url])
        server.failures["/t10k-images-idx3-ubyte.gz"] = 1
        data = load_dataset("mnist", tmp_path / "data", download=True)
    assert data.train_inputs.shape == (60_000, 1, 28, 28)
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == sorted(idx_module.FILES)
    assert server.requests.count("/t10k-images-idx3-ubyte.gz") == 2, "the truncated transfer was retried"


def test_each_mirror_is_retried_with_doubling_pauses_before_the_next(tmp_path):
    served = tmp_path / "server" / "mnist"
    served.mkdir(parents=True)
    (served / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not the real file")
    pauses: list[float] = []
    with _Server(served) as server:
        with pytest.raises(DataError, match=r"could not download"):
            download(["http://127.0.0.1:9/unreachable/t10k-labels-idx1-ubyte.gz", server.url + "t10k-labels-idx1-ubyte.gz"],
                     tmp_path / "data", "mnist/t10k-labels-idx1-ubyte.gz", retries=3, sleep=pauses.append, progress=False)
    assert pauses == [1.0, 2.0, 1.0, 2.0], "1 s, then 2 s between the tries of each mirror"
    assert server.requests.count("/t10k-labels-idx1-ubyte.gz") == 3


def test_a_corrupt_download_is_retried_then_refused_and_nothing_is_left(data_dir, tmp_path):
    served = tmp_path / "server" / "mnist"
    served.mkdir(parents=True)
    (served / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not the real file")
    with _Server(served) as server:
        with pytest.raises(DataError, match=r"could not download mnist/t10k-labels-idx1-ubyte.gz .*does not match its published sha256"):
            download([server.url + "t10k-labels-idx1-ubyte.gz"], tmp_path / "data", "mnist/t10k-labels-idx1-ubyte.gz", retries=2, backoff=0)
    assert server.requests.count("/t10k-labels-idx1-ubyte.gz") == 2
    assert not any((tmp_path / "data" / "mnist").iterdir())


def test_sst2_downloads_the_glue_zip_and_checks_the_tables(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(files_module, "BACKOFF_SECONDS", 0.0)
    served = tmp_path / "server"
    served.mkdir()
    with zipfile.ZipFile(served / "SST-2.zip", "w") as archive:
        for name in ("train", "dev", "test"):
            archive.write(data_dir / "sst2" / f"{name}.tsv", f"SST-2/{name}.tsv")
    with _Server(served) as server:
        monkeypatch.setattr(sst2_module, "URL", server.url + "SST-2.zip")
        data = load_dataset("sst2", tmp_path / "data", download=True)
    assert data.evaluations["dev"][0].shape == (872, 64)
    assert not (tmp_path / "data" / "sst2" / "SST-2.zip").exists()


# --- Batching and augmentation ----------------------------------------------------------------------


def test_batches_cover_the_data_once_in_a_seeded_order():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    order = torch.cat([b[1] for b in batches(x, y, 3, torch.Generator().manual_seed(0))])
    assert sorted(order.tolist()) == list(range(10))
    again = torch.cat([b[1] for b in batches(x, y, 3, torch.Generator().manual_seed(0))])
    assert torch.equal(order, again)


def test_random_crop_flip_moves_pixels_without_changing_them():
    """Every output image is its input zero-padded by 2, cropped at some offset and perhaps mirrored;
    over a batch, the offsets and flips vary (an identity function fails this)."""
    images = torch.arange(32 * 3 * 8 * 8, dtype=torch.float32).reshape(32, 3, 8, 8) + 1
    out = random_crop_flip(images, torch.Generator().manual_seed(0), padding=2)
    assert out.shape == images.shape
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))  # (32, 3, 12, 12)
    found = []
    for i in range(32):
        matches = [(top, left, flip) for top in range(5) for left in range(5) for flip in (False, True)
                   if torch.equal(out[i], (lambda crop: crop.flip(-1) if flip else crop)(padded[i, :, top : top + 8, left : left + 8]))]
        assert len(matches) == 1, f"image {i} is not a crop of its padded self"
        found.append(matches[0])
    assert len({(top, left) for top, left, _ in found}) >= 5, "the offsets vary"
    assert 0 < sum(flip for _, _, flip in found) < 32, "some images are mirrored, some not"
    again = random_crop_flip(images, torch.Generator().manual_seed(0), padding=2)
    assert torch.equal(out, again), "the generator alone decides"
