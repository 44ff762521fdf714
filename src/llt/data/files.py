"""Safe handling of untrusted dataset files: restricted unpickling, checksums, safe extraction, downloads.

The official CIFAR archives are Python pickles. `pickle.load` on a crafted file runs arbitrary code, so
`safe_unpickle` admits only what a CIFAR batch needs: builtin containers and scalars (handled by the
pickle machine itself, without any global lookup), numpy array reconstruction, and `_codecs.encode` for
byte strings written by Python 3 at protocol 2 (restricted to the latin-1 codec). Any other global is
refused with an error naming it.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

from llt.errors import LLTError


# ------------------------------------------------------------------------------------------ unpickling

def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _latin1_encode(text, encoding="latin1", errors="strict"):
    # Python 3 writes bytes at protocol 2 as _codecs.encode(str, 'latin1'); allow exactly that.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1", errors)


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")
        return factory()


def safe_unpickle(data: bytes, source: str):
    """Unpickle `data` (bytes of a file named `source`) admitting only containers and numpy arrays. The
    pickle's opcodes are checked first (llt.safeload: no length past the end of the data, no huge integer or
    memo index), so nothing it declares can allocate more than the file holds."""
    from llt.safeload import _check_pickle

    _check_pickle(data, source, limit=len(data))
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, MemoryError,
            KeyError, UnicodeDecodeError) as e:
        raise LLTError(f"{source}: refused to unpickle ({e}); the file is corrupt or not a dataset pickle") from None


# ------------------------------------------------------------------------------------------ checksums

def md5_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(*arrays) -> str:
    """SHA-256 over the raw bytes of numpy arrays / torch tensors (a content fingerprint)."""
    h = hashlib.sha256()
    for a in arrays:
        a = a.numpy() if hasattr(a, "numpy") else np.asarray(a)
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def source_fingerprint(paths) -> str:
    """Cheap fingerprint of source files (path, size, mtime): changes when any file is replaced or edited."""
    h = hashlib.sha256()
    for p in sorted(str(p) for p in paths):
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------ extraction

def safe_extract(archive: str | Path, target: str | Path, members: list[str] | None = None) -> None:
    """Extract a tar archive into `target`, refusing members that would land outside it.

    Absolute paths, '..' components, links and device files are refused with an error naming the member.
    Extraction goes to a temporary sibling folder first and is renamed into place, so an interrupted or
    refused extraction never leaves a partial dataset that looks complete.
    """
    archive, target = Path(archive), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise LLTError(f"{archive}: not a readable tar archive ({e})") from None
    with tar:
        chosen = []
        root = Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent)).resolve()
        try:
            for m in tar.getmembers():
                name = m.name
                dest = (root / name).resolve()
                if os.path.isabs(name) or ".." in Path(name).parts or not str(dest).startswith(str(root) + os.sep):
                    raise LLTError(f"{archive}: member {name!r} would be written outside the target folder; refusing the archive")
                if m.issym() or m.islnk() or m.isdev() or m.isfifo():
                    raise LLTError(f"{archive}: member {name!r} is a link or special file; refusing the archive")
                if members is None or any(name == x or name.startswith(x.rstrip("/") + "/") for x in members):
                    chosen.append(m)
            for m in chosen:
                if m.isdir():
                    (root / m.name).mkdir(parents=True, exist_ok=True)
                    continue
                out = root / m.name
                out.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                if src is None:
                    continue
                with src, open(out, "wb") as f:
                    shutil.copyfileobj(src, f)
            for entry in root.iterdir():
                final = target / entry.name
                if final.exists():
                    shutil.rmtree(final) if final.is_dir() else final.unlink()
                target.mkdir(parents=True, exist_ok=True)
                os.replace(entry, final)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise LLTError(f"{archive}: extraction failed ({e}); the archive is truncated or corrupt") from None
        finally:
            shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------------ downloads

def download(url: str, dest: str | Path, md5: str, opener=None) -> Path:
    """Download `url` to `dest` (atomically) and check its MD5; raise LLTError on failure or mismatch.

    `opener` defaults to urllib.request.urlopen; tests pass a fake one (the tests never use the network).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    opener = opener or urllib.request.urlopen
    tmp = dest.with_name(dest.name + ".part")
    print(f"[llt] downloading {url} -> {dest}", flush=True)
    try:
        with opener(url) as resp, open(tmp, "wb") as f:
            shutil.copyfileobj(resp, f, length=1 << 20)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise LLTError(f"could not download {url} ({e}); place {dest.name} (md5 {md5}) in the data folder "
                       f"or the cache folder by hand") from None
    got = md5_file(tmp)
    if got != md5:
        tmp.unlink(missing_ok=True)
        raise LLTError(f"{dest.name}: downloaded file has md5 {got}, expected {md5}; not using it")
    os.replace(tmp, dest)
    return dest


def cache_root(cache_dir: str = "") -> Path:
    """Cache folder: the config value, else $LLT_CACHE_DIR, else ~/.cache/lifelong-tickets."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("LLT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lifelong-tickets"


def download_allowed(flag: bool) -> bool:
    return flag or os.environ.get("LLT_DOWNLOAD", "").lower() in ("1", "true", "yes")
