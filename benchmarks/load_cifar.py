"""Load time of CIFAR-10 from the extracted folder (decode + MD5 check + cache write) and from the cache.

    python benchmarks/load_cifar.py --data-dir DIR [--repeats 5]

DIR must hold cifar-10-batches-py/ (e.g. written by ../shared/data/unpack.py). Prints JSON.
"""

import argparse
import json
import statistics
import tempfile
import time

import _common  # noqa: F401  (sets the import path)
from _common import machine

from llt.data.cifar import load_cifar


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    folder, cache = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:          # a fresh, empty cache each time
            t0 = time.perf_counter()
            load_cifar("cifar10", args.data_dir, cache_dir=tmp)
            folder.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ds = load_cifar("cifar10", args.data_dir, cache_dir=tmp)
            cache.append(time.perf_counter() - t0)
    print(json.dumps({
        "benchmark": "load_cifar10",
        "from_folder_seconds": round(statistics.median(folder), 3),
        "from_cache_seconds": round(statistics.median(cache), 3),
        "repeats": args.repeats,
        "num_images": int(ds.train_labels.numel() + ds.test_labels.numel()),
        "note": "folder: MD5 of 7 files + restricted unpickling + writing the decoded cache; files in the OS page cache",
        **machine(),
    }, indent=2))


if __name__ == "__main__":
    main()
