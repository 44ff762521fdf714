#!/usr/bin/env bash
# On the GPU machine: collect the data parts carried in .device-data/ (one part per device call, see
# docs/benchmarks.md) under ~/data/parts, and unpack CIFAR-10 and the Tiny-ImageNet pool into ~/data once
# every part is there. Safe to call repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p ~/data/parts
[ -d .device-data ] && cp -rn .device-data/. ~/data/parts/
need=(unpack.py cifar10-batches.meta cifar10-batch-headers cifar10-jpeg.npz
      pool-tinyimagenet32-part0.npz pool-tinyimagenet32-part1.npz)
for f in "${need[@]}"; do
    if [ ! -e ~/data/parts/"$f" ]; then echo "data parts so far: $(ls ~/data/parts | tr '\n' ' ')"; exit 0; fi
done
if [ ! -f ~/data/tinyimagenet32-pool.npy ]; then
    python ~/data/parts/unpack.py --out ~/data
fi
ls -la ~/data
