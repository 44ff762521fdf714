"""Console output: the progress display of a run and the tables printed at the end of tasks and runs."""

from __future__ import annotations

import json
import sys
import time


class Progress:
    """Progress of a run, by mode:
    - "auto": a bar per training on a terminal (loss, validation accuracy, time left for the whole run);
      elsewhere (logs, remote machines) one line every `every` epochs;
    - "jsonl": one JSON object per epoch on stderr, for machines;
    - "quiet": nothing (the per-task lines and the final table are printed all the same)."""

    MODES = ("auto", "quiet", "jsonl")

    def __init__(self, total_epochs: int, mode: str = "auto", every: int = 10):
        if mode not in self.MODES:
            raise ValueError(f"progress mode must be one of {self.MODES}, got {mode!r}")
        self.total, self.done, self.seconds, self.mode, self.every = total_epochs, 0, 0.0, mode, every
        self.bar, self.desc, self.epochs, self.tty = None, "", 0, sys.stderr.isatty()

    def skip(self, epochs: int) -> None:
        """Epochs of a stage that finished earlier (they count as done for the estimate)."""
        self.total -= epochs

    def start(self, desc: str, epochs: int, done: int = 0):
        """A training of `epochs` epochs begins; `done` of them were finished before (a resumed training)."""
        self.desc, self.epochs = desc, epochs
        self.skip(done)
        if self.mode != "auto" or not self.tty:
            return
        from tqdm import tqdm

        self.bar = tqdm(total=epochs, initial=done, desc=desc, unit="ep", leave=False, file=sys.stderr,
                        dynamic_ncols=True)

    def update(self, epoch: int, stats: dict):
        self.done += 1
        self.seconds += stats["seconds"]
        left_s = self.seconds / self.done * max(self.total - self.done, 0)
        left = time.strftime("%H:%M:%S", time.gmtime(left_s))
        if self.mode == "jsonl":
            print(json.dumps({"event": "epoch", "stage": self.desc, "epoch": epoch, "epochs": self.epochs,
                              "loss": stats["loss"], "val": stats["val"], "lr": stats["lr"],
                              "seconds": round(stats["seconds"], 4), "run_seconds_left": round(left_s, 1)}),
                  file=sys.stderr, flush=True)
        elif self.bar is not None:
            self.bar.set_postfix(loss=f"{stats['loss']:.3f}", val=f"{stats['val']:.1f}", run_left=left, refresh=False)
            self.bar.update(1)
        elif self.mode == "auto" and (epoch % self.every == 0 or epoch == self.epochs):
            print(f"  {self.desc} epoch {epoch}/{self.epochs}: loss {stats['loss']:.4f} val {stats['val']:.2f} "
                  f"lr {stats['lr']:.2g} | {stats['seconds']:.2f} s/epoch | run left {left}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def format_matrix(R: list[list[float]], sa: list[float], forgetting: list, remaining: list[float]) -> str:
    n = len(R)
    head = "after  " + " ".join(f"{'T' + str(i + 1):>6}" for i in range(n)) + f" {'SA':>7} {'forget':>7} {'weights%':>9}"
    lines = [head, "-" * len(head)]
    for t, row in enumerate(R):
        cells = " ".join(f"{v:6.2f}" for v in row) + " " * (7 * (n - t - 1))
        f = "" if forgetting[t] is None else f"{forgetting[t]:.2f}"
        lines.append(f"T1~{t + 1:<3} {cells} {sa[t]:7.2f} {f:>7} {remaining[t]:9.2f}")
    return "\n".join(lines)


def task_line(t: int, n: int, row: list[float], extra: str = "") -> str:
    return (f"task {t + 1}/{n}: test accuracy per task " + " ".join(f"{v:.2f}" for v in row)
            + f" | SA {sum(row) / len(row):.2f}" + (f" | {extra}" if extra else ""))


def format_stream_table(rows: list[dict], pool_info: dict) -> str:
    head = f"{'task':>4}  {'classes':<16} {'names':<28} {'train':>6} {'val':>5} {'test':>5} {'memory':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        names = ", ".join(r["names"])
        lines.append(f"{r['task']:>4}  {', '.join(map(str, r['classes'])):<16} {names[:28]:<28} "
                     f"{r['num_train']:>6} {r['num_val']:>5} {r['num_test']:>5} {r['num_memory']:>6}")
    pool = pool_info.get("num_images")
    lines.append(f"unlabeled pool: {pool_info.get('pool')} ({pool} images)" if pool is not None else "unlabeled pool: none")
    return "\n".join(lines)


def format_comparison(bu: dict, tr: dict) -> str:
    """Per task: SA of the dense reference, the Bottom-Up ticket and the re-trained ticket, and remaining weights."""
    head = f"{'after':<7} {'dense SA':>9} {'BU SA':>8} {'TR-BU SA':>9} {'weights%':>9}  decision"
    lines = [head, "-" * len(head)]
    for t in range(bu["num_tasks"]):
        lines.append(f"T1~{t + 1:<4} {bu['reference_sa'][t]:9.2f} {bu['sa'][t]:8.2f} {tr['sa'][t]:9.2f} "
                     f"{bu['remaining_weights'][t]:9.2f}  {bu['decisions'][t].split(':')[0]}")
    lines.append(f"re-grows that ran to the cap (prune.max_rounds): {bu['regrows_hit_cap']} of {bu['regrows']}; "
                 f"task-1 pruning ran to the cap: {'yes' if bu['first_task_hit_cap'] else 'no'}")
    return "\n".join(lines)
