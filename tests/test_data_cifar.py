"""CIFAR readers: official structure, checksums, safe unpickling, safe extraction, mocked downloads, cache."""

import io
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from conftest import SHARED_DATA, Evil, make_archive, make_cifar10_folder, make_cifar100_folder, trust_generated
from llt.data import cifar
from llt.data.files import md5_file, safe_unpickle
from llt.errors import LLTError


def test_extracted_folder_with_official_structure_loads(tmp_path, capsys):
    make_cifar10_folder(tmp_path)
    ds = cifar.load_cifar("cifar10", tmp_path)
    assert ds.train_images.shape == (100, 3, 32, 32) and ds.train_images.dtype.is_floating_point is False
    assert ds.test_images.shape == (20, 3, 32, 32)
    assert ds.train_labels.dtype.itemsize == 8 and int(ds.train_labels.max()) <= 9
    assert ds.class_names[9] == "truck"
    # the generated files are not the official release: said loudly and recorded
    assert ds.provenance["checksums_matched"] is False and ds.provenance["status"] == "modified"
    assert "differ from the official release" in capsys.readouterr().err
    entry = ds.provenance["files"]["data_batch_1"]
    assert entry["expected_md5"] == "c99cafc152244af753f735de768cd75f" and entry["md5"] != entry["expected_md5"]


def test_pixels_follow_the_official_channel_planes(tmp_path):
    folder = make_cifar10_folder(tmp_path)
    raw = pickle.loads((folder / "data_batch_1").read_bytes(), encoding="bytes")
    ds = cifar.load_cifar("cifar10", tmp_path)
    first = raw[b"data"][0]
    assert np.array_equal(ds.train_images[0, 0].numpy().ravel(), first[:1024])      # red plane
    assert np.array_equal(ds.train_images[0, 2].numpy().ravel(), first[2048:])      # blue plane
    assert ds.train_labels[0] == raw[b"labels"][0]


def test_matching_checksums_are_reported_as_official(tmp_path, monkeypatch, capsys):
    folder = make_cifar10_folder(tmp_path)
    trust_generated(monkeypatch, folder)
    ds = cifar.load_cifar("cifar10", tmp_path)
    assert ds.provenance["checksums_matched"] is True and ds.provenance["status"] == "official"
    assert "WARNING" not in capsys.readouterr().err


def test_require_official_refuses_modified_data(tmp_path):
    make_cifar10_folder(tmp_path)
    with pytest.raises(LLTError, match=r"data_batch_1: md5 .* differs from the official c99cafc152244af753f735de768cd75f"):
        cifar.load_cifar("cifar10", tmp_path, require_official=True)


def test_missing_file_names_file_and_expected_checksum(tmp_path):
    folder = make_cifar10_folder(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(LLTError, match=r"data_batch_3 \(expected md5 54ebc095f3ab1f0389bbae665268c751\)"):
        cifar.load_cifar("cifar10", tmp_path)


def test_truncated_file_names_file_and_expected_checksum(tmp_path):
    folder = make_cifar10_folder(tmp_path)
    data = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(data[: len(data) // 2])
    with pytest.raises(LLTError, match=r"test_batch.*40351d587109b95175f43aff81a1287e"):
        cifar.load_cifar("cifar10", tmp_path)


def test_crafted_pickle_cannot_run_code(tmp_path):
    folder = make_cifar10_folder(tmp_path)
    sentinel = tmp_path / "pwned"
    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": Evil(sentinel)}, protocol=2))
    with pytest.raises(LLTError, match=r"data_batch_2.*refused to unpickle.*posix.system|data_batch_2.*not allowed"):
        cifar.load_cifar("cifar10", tmp_path)
    assert not sentinel.exists()


@pytest.mark.parametrize("payload", [
    pickle.dumps(Evil("/tmp/never"), protocol=4),
    b"cbuiltins\neval\n(S'1+1'\ntR.",                    # a global outside the allow-list
    b"c_codecs\nencode\n(S'abc'\nS'rot13'\ntR.",          # an allowed global with a forbidden argument
])
def test_restricted_unpickler_refuses_other_globals(payload):
    with pytest.raises(LLTError, match="refused to unpickle"):
        safe_unpickle(payload, "crafted.pkl")


def test_restricted_unpickler_reads_python3_protocol2_arrays():
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = safe_unpickle(pickle.dumps({b"data": a, "n": [1, 2.5, (3, None)]}, protocol=2), "x")
    assert np.array_equal(out[b"data"], a) and out["n"] == [1, 2.5, (3, None)]


def test_official_archive_is_checked_and_extracted_into_the_cache(tmp_path, monkeypatch):
    src = tmp_path / "src"
    folder = make_cifar10_folder(src)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    archive = make_archive(folder, data_dir / "cifar-10-python.tar.gz")
    trust_generated(monkeypatch, folder, archive)
    ds = cifar.load_cifar("cifar10", data_dir)
    assert ds.provenance["archive_matched"] is True and ds.provenance["checksums_matched"] is True
    assert (tmp_path / "cache" / "cifar-10-batches-py" / "data_batch_1").is_file()
    assert ds.train_images.shape[0] == 100


def test_archive_with_wrong_md5_is_refused(tmp_path):
    src = tmp_path / "src"
    folder = make_cifar10_folder(src)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    make_archive(folder, data_dir / "cifar-10-python.tar.gz")
    with pytest.raises(LLTError, match=r"cifar-10-python.tar.gz: md5 \w+ does not match the official c58f30108f718f92721af3b95e74349a"):
        cifar.load_cifar("cifar10", data_dir)
    assert not (tmp_path / "cache" / "cifar-10-batches-py").exists()


def test_archive_member_outside_target_is_refused(tmp_path, monkeypatch):
    src = tmp_path / "src"
    folder = make_cifar10_folder(src)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    archive = make_archive(folder, data_dir / "cifar-10-python.tar.gz", extra={"../../escaped.txt": b"gotcha"})
    trust_generated(monkeypatch, folder, archive)
    with pytest.raises(LLTError, match=r"member '../../escaped.txt' would be written outside the target folder"):
        cifar.load_cifar("cifar10", data_dir)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "cache" / "escaped.txt").exists()
    assert not (tmp_path / "cache" / "cifar-10-batches-py").exists()  # nothing half-extracted


def test_missing_data_without_download_says_how_to_get_it(tmp_path):
    with pytest.raises(LLTError, match=r"cifar-10-python.tar.gz \(md5 c58f30108f718f92721af3b95e74349a\).*--download"):
        cifar.load_cifar("cifar10", tmp_path)


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def test_download_when_allowed_uses_the_official_address_and_checks_md5(tmp_path, monkeypatch):
    src = tmp_path / "src"
    folder = make_cifar10_folder(src)
    archive = make_archive(folder, tmp_path / "served.tar.gz")
    trust_generated(monkeypatch, folder, archive)
    asked = []

    def opener(url):
        asked.append(url)
        return FakeResponse(archive.read_bytes())

    ds = cifar.load_cifar("cifar10", tmp_path / "empty", allow_download=True, opener=opener)
    assert asked == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert (tmp_path / "cache" / "cifar-10-python.tar.gz").is_file()
    assert ds.provenance["checksums_matched"] is True


def test_download_with_wrong_content_keeps_nothing(tmp_path):
    with pytest.raises(LLTError, match="downloaded file has md5 .* expected c58f30108f718f92721af3b95e74349a"):
        cifar.load_cifar("cifar10", tmp_path, allow_download=True, opener=lambda url: FakeResponse(b"not an archive"))
    assert not any((tmp_path / "cache").glob("cifar-10-python.tar.gz*"))


def test_download_failure_offline_is_a_clear_error(tmp_path):
    def offline(url):
        raise OSError("Network is unreachable")

    with pytest.raises(LLTError, match="could not download .*Network is unreachable.*md5 c58f30108f718f92721af3b95e74349a"):
        cifar.load_cifar("cifar10", tmp_path, allow_download=True, opener=offline)


def test_download_allowed_by_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("LLT_DOWNLOAD", "1")
    with pytest.raises(LLTError, match="could not download"):
        cifar.load_cifar("cifar10", tmp_path, opener=lambda url: (_ for _ in ()).throw(OSError("offline")))


def test_decoded_cache_is_reused_and_invalidated_when_a_file_changes(tmp_path):
    folder = make_cifar10_folder(tmp_path)
    first = cifar.load_cifar("cifar10", tmp_path)
    cache_files = sorted((tmp_path / "cache" / "decoded").glob("cifar10-*.npz"))
    assert len(cache_files) == 1
    second = cifar.load_cifar("cifar10", tmp_path)
    assert second.provenance["decoded_cache"] == str(cache_files[0])
    assert np.array_equal(first.train_images.numpy(), second.train_images.numpy())
    # replace one batch with other pixels: a new cache entry, and the new pixels are used
    raw = pickle.loads((folder / "data_batch_1").read_bytes(), encoding="bytes")
    raw[b"data"] = 255 - raw[b"data"]
    (folder / "data_batch_1").write_bytes(pickle.dumps(raw, protocol=2))
    os.utime(folder / "data_batch_1", ns=(1, 1))
    third = cifar.load_cifar("cifar10", tmp_path)
    assert len(list((tmp_path / "cache" / "decoded").glob("cifar10-*.npz"))) == 2
    assert np.array_equal(third.train_images[0].numpy(), 255 - first.train_images[0].numpy())


def test_cifar100_fine_labels_and_names(tmp_path):
    make_cifar100_folder(tmp_path)
    ds = cifar.load_cifar("cifar100", tmp_path)
    assert ds.num_classes == 100 and ds.train_images.shape == (200, 3, 32, 32)
    assert sorted(set(ds.train_labels.tolist())) == list(range(100)) and ds.class_names[5] == "c5"
    assert ds.mean == (0.5071, 0.4866, 0.4409)


@pytest.mark.skipif(not (SHARED_DATA / "cifar10-batches.meta").is_file(), reason="../shared/data not present")
def test_real_official_meta_file_reads_with_the_restricted_unpickler():
    path = SHARED_DATA / "cifar10-batches.meta"
    assert md5_file(path) == cifar.CIFAR10.meta_file[1]
    meta = safe_unpickle(path.read_bytes(), str(path))
    assert meta[b"label_names"][9] == b"truck" and meta[b"num_cases_per_batch"] == 10000


@pytest.fixture(scope="session")
def real_cifar10_dir(tmp_path_factory):
    """A folder with the real CIFAR-10 copy: $LLT_TEST_CIFAR10_DIR, else unpacked from ../shared/data (~10 s)."""
    env = os.environ.get("LLT_TEST_CIFAR10_DIR")
    if env:
        return env
    if not (SHARED_DATA / "unpack.py").is_file() or not (SHARED_DATA / "cifar10-jpeg.npz").is_file():
        pytest.skip("../shared/data not present (and LLT_TEST_CIFAR10_DIR not set)")
    pytest.importorskip("PIL")
    out = tmp_path_factory.mktemp("real-cifar10")
    subprocess.run([sys.executable, str(SHARED_DATA / "unpack.py"), "--out", str(out), "--skip-pool"],
                   check=True, capture_output=True, timeout=600)
    return str(out)


def test_real_cifar10_copy_loads_and_is_flagged_as_modified(real_cifar10_dir, capsys):
    ds = cifar.load_cifar("cifar10", real_cifar10_dir)
    info = ds.info()
    assert info["num_train"] == 50000 and info["num_test"] == 10000
    assert info["train_per_class"] == [5000] * 10 and info["test_per_class"] == [1000] * 10
    assert ds.class_names == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert ds.provenance["files"]["batches.meta"]["matched"] is True       # the meta file is the official one
    assert ds.provenance["files"]["data_batch_1"]["matched"] is False      # the pixels come from JPEGs
    assert ds.provenance["checksums_matched"] is False
    assert "NOT the official cifar10 data" in capsys.readouterr().err
    # the stream of the paper preset on the real labels: 4,500 / 500 per class, 2,000 test images per task
    from llt.data.stream import build_stream
    s = build_stream("cifar10", ds.train_labels, ds.test_labels, 10, classes_per_task=2)
    assert [t.classes for t in s.tasks][0] == (9, 8)
    assert all(t.train_idx.numel() == 9000 and t.val_idx.numel() == 1000 and t.test_idx.numel() == 2000 for t in s.tasks)
    assert s.memory(4).numel() == 800
