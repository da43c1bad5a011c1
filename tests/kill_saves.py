"""Kill saves at random moments and check what is left (run by test_io.test_killed_saves).

    python tests/kill_saves.py OUT_DIR KILLS SEED

One process builds two tiny MoE models (A and B) once, then, KILLS times, forks a child that saves
A and B in turn to OUT_DIR/ck (the first save is a fresh one, the rest overwrites) and SIGKILLs it
after a random delay. After each kill it inspects the folder, runs what the next call runs
(``io.recover_interrupted``), and checks that the target is A or B, complete (or absent only when no
save had finished), and that no temporary is left. Prints one JSON line with what it saw.
"""

import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import threading

import torch
from tqdm import tqdm

torch.set_num_threads(1)  # before any fork: a child must not inherit a busy thread pool
# tqdm's default lock is a multiprocessing lock that forked children share: a child killed while it
# holds it (drawing a progress bar) would block this process for ever. A thread lock is copied instead.
tqdm.set_lock(threading.RLock())

from moelab import io, models  # noqa: E402


def main(out_dir: str, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    a = models.tiny_model("qwen3_moe", num_experts=4, top_k=2, seed=1)
    b = models.tiny_model("qwen3_moe", num_experts=4, top_k=2, seed=2)
    want = {name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in (("A", a), ("B", b))}
    root = Path(out_dir)
    target = root / "ck"
    seen = {"kills": 0, "absent_before_recovery": 0, "temporaries_before_recovery": 0, "restored": 0,
            "found": {"A": 0, "B": 0, "absent": 0}, "errors": []}
    # Kill delays scale with how long one save takes here, so that a slow or busy machine still sees
    # kills before, during and after saves (a fixed window once left 10 of 40 targets never written).
    t0 = time.perf_counter()
    io.save_checkpoint(a, root / "timing", overwrite=True)
    window = max(0.25, 2.5 * (time.perf_counter() - t0))
    shutil.rmtree(root / "timing")
    existed = False
    for i in range(kills):
        pid = os.fork()
        if pid == 0:  # the saver: fresh save or overwrite, A and B in turn, until killed
            try:
                k = i
                while True:
                    io.save_checkpoint(a if k % 2 else b, target, overwrite=True)
                    k += 1
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, window))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        seen["kills"] += 1
        leftovers = [p.name for p in root.iterdir() if p.name != "ck"]
        seen["temporaries_before_recovery"] += bool(leftovers)
        seen["absent_before_recovery"] += not target.exists()
        done = io.recover_interrupted(target)
        seen["restored"] += any(d.startswith("restored") for d in done)
        after = sorted(p.name for p in root.iterdir())
        if after not in (["ck"], []):
            seen["errors"].append(f"kill {i}: left {after}")
        if not target.exists():
            seen["found"]["absent"] += 1
            if existed:  # a checkpoint that was there is gone: the one thing a save must never do
                seen["errors"].append(f"kill {i}: the target existed before and is gone")
            continue
        existed = True
        try:
            state = models.load_model(target).state_dict()
        except Exception as exc:  # noqa: BLE001 - any failure to read is an incomplete checkpoint
            seen["errors"].append(f"kill {i}: unreadable ({type(exc).__name__}: {exc})")
            continue
        match = [n for n, w in want.items() if set(w) <= set(state) and all(torch.equal(w[k], state[k]) for k in w)]
        if match:
            seen["found"][match[0]] += 1
        else:
            seen["errors"].append(f"kill {i}: the checkpoint is neither A nor B")
    seen["window_s"] = window
    print(json.dumps(seen))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
