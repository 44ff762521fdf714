"""How much a background checkpoint writer slows a Python thread (the GIL it holds), per way of saving.

    python benchmarks/writer_gil.py [--width 64]

A full-width training state (model, momentum-sized copy, best state: about 128 MB) is saved on a
second thread while the main thread spins a pure-Python loop; the loop's speed relative to its speed
beside a sleeping thread is the share of the GIL the main thread kept. A training loop that is bound
by the host launching kernels (eager mode on a GPU) loses about as much. Prints JSON.
"""

import argparse
import io
import json
import os
import tempfile
import threading
import time

import _common  # noqa: F401
import torch
from _common import machine

from llt.models import build_model


def spin_while(fn) -> tuple[float, float]:
    """(iterations per second of a pure-Python loop while fn runs on another thread, fn's seconds)."""
    done, out = [False], {}

    def worker():
        t0 = time.perf_counter()
        fn()
        out["seconds"] = time.perf_counter() - t0
        done[0] = True

    thread, n = threading.Thread(target=worker), 0
    t0 = time.perf_counter()
    thread.start()
    while not done[0]:
        n += 1
    elapsed = time.perf_counter() - t0
    thread.join()
    return n / elapsed, out["seconds"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=64)
    args = ap.parse_args()
    sd = {k: v.clone() for k, v in build_model(5, 2, width=args.width).state_dict().items()}
    state = {"model": sd, "momentum": {k: v.clone() for k, v in sd.items()}, "best": {k: v.clone() for k, v in sd.items()}}
    folder = tempfile.mkdtemp(prefix="llt-gil-", dir=".")

    def via_buffer():
        buf = io.BytesIO()
        torch.save(state, buf)
        with open(os.path.join(folder, "a.pt"), "wb") as f:
            f.write(buf.getvalue())
            os.fsync(f.fileno())

    def via_path():
        path = os.path.join(folder, "b.pt")
        torch.save(state, path)
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)

    base, _ = spin_while(lambda: time.sleep(0.5))
    out = {}
    for name, fn in (("torch_save_to_buffer_then_file", via_buffer), ("torch_save_to_path", via_path)):
        rate, seconds = spin_while(fn)
        out[name] = {"main_thread_speed_percent": round(100 * rate / base, 1), "save_seconds": round(seconds, 3)}
    size = os.path.getsize(os.path.join(folder, "b.pt"))
    for f in os.listdir(folder):
        os.unlink(os.path.join(folder, f))
    os.rmdir(folder)
    print(json.dumps({"benchmark": "writer_gil", "width": args.width, "checkpoint_mb": round(size / 2**20, 1), **out,
                      **machine()}, indent=2))


if __name__ == "__main__":
    main()
