"""The sizes of the lottery loop's sub-batches (METHOD 3.2), without torch: config validation reads them."""

from __future__ import annotations


def balanced_sizes(sub_batch: int, num_old_tasks: int) -> tuple[int, int]:
    """Sizes of the new- and old-class parts of the balanced batch: int(b/(k+1)), int(b*k/(k+1))."""
    k = num_old_tasks
    return sub_batch // (k + 1), sub_batch * k // (k + 1)


def empty_sub_batch(batch_size: int, num_tasks: int, memory: bool) -> str | None:
    """Why the lottery loop's balanced batch would be empty at some task, in one line; None when it never is.

    Task k+1 (k old tasks) draws int(b/(k+1)) new and int(b*k/(k+1)) old images, b = batch_size // 4: the new
    part is empty from k + 1 > b on, the old part (with a memory) when b < 2. A cross-entropy over an empty
    batch is NaN, so such a config is refused up front. The smallest batch that works is 4 * max(T, 2)."""
    b = batch_size // 4
    for k in range(1, num_tasks):
        n_new, n_old = balanced_sizes(b, k)
        if n_new <= 0 or (memory and n_old <= 0):
            part = "new-task" if n_new <= 0 else "old-class"
            return (f"train.batch_size={batch_size}: at task {k + 1} of {num_tasks} the balanced batch (b = batch_size "
                    f"// 4 = {b}) would hold {n_new} new and {n_old} old images (int(b/(k+1)), int(b*k/(k+1)), k = {k}): "
                    f"an empty {part} sub-batch; the smallest train.batch_size for {num_tasks} tasks is "
                    f"{4 * max(num_tasks, 2)}")
    return None
