"""The method-protocol loop against the loop it replaced, for iCT, side by side in one run.

Two worker processes train the same recipe: one imports cmgen from this checkout, the other from
a `git worktree` of REF (default dc2b850, the last commit before the protocol). The coordinator
asks them for one repetition at a time, alternately, so machine-load drift hits both alike. Each
repetition times the ideal for the backbone and batch (one no-grad forward + one forward-backward
of the bare network, the two passes iCT needs) and one full training step of the loop. Prints
medians, each loop's ratio to its own ideal, and new/old.

    python benchmarks/bench_loop_protocol.py [--ref dc2b850] [--recipe ict_digits] [--batch 64] [--reps 15]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(recipe_name: str, batch: int, threads: int) -> None:
    import torch

    import cmgen
    from bench_ict_step import ideal_step  # this script's folder is on sys.path
    from cmgen.recipe import load_recipe
    from cmgen.train import Trainer, configure_threads

    configure_threads(threads)
    recipe = load_recipe(recipe_name, [f"train.batch_size={batch}", "train.log_every=1000000",
                                       "train.checkpoint_every=1000000", "train.sample_every=0", "eval.every=0"])
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(recipe, Path(tmp), progress=False)
        net = tr.accelerator.unwrap_model(tr.model).backbone
        x = torch.randn(batch, *tr.data.shape)
        t = torch.randn(batch) * 100
        y = torch.arange(batch) % max(1, tr.data.num_classes) if recipe.model.class_conditional else None

        ideal = ideal_step(net, x, t, y)

        def timed(fn):
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start

        ideal(), tr.train_step()  # warm-up
        print(json.dumps({"ready": str(Path(cmgen.__file__).parent)}), flush=True)
        for line in sys.stdin:
            if line.strip() != "rep":
                break
            print(json.dumps({"ideal": timed(ideal), "step": timed(tr.train_step)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", default="dc2b850", help="git ref of the old loop (default: the last pre-protocol commit)")
    ap.add_argument("--recipe", default="ict_digits")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.recipe, args.batch, args.threads)

    with tempfile.TemporaryDirectory(prefix="cmgen-bench-") as tmp:
        old_tree = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old_tree), args.ref],
                       check=True, capture_output=True)
        try:
            procs = {}
            for name, src in (("old", old_tree), ("new", ROOT)):
                env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(args.threads)}
                procs[name] = subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve()), "--worker", "--recipe", args.recipe, "--batch",
                     str(args.batch), "--threads", str(args.threads)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tmp)
            for name, p in procs.items():
                where = json.loads(p.stdout.readline())["ready"]
                print(f"{name}: cmgen from {where}")
            res = {n: {"ideal": [], "step": []} for n in procs}
            for _ in range(args.reps):
                for name, p in procs.items():  # alternate: one repetition each
                    p.stdin.write("rep\n")
                    p.stdin.flush()
                    row = json.loads(p.stdout.readline())
                    for k in row:
                        res[name][k].append(row[k])
            for p in procs.values():
                p.stdin.close()
                p.wait()
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)],
                           capture_output=True)
    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in res.items()}
    print(f"recipe {args.recipe}, batch {args.batch}, {args.threads} thread(s), {args.reps} alternating reps (medians)")
    for n in ("old", "new"):
        m = med[n]
        print(f"  {n} loop ({args.ref if n == 'old' else 'this checkout'}): step {m['step'] * 1e3:7.1f} ms, "
              f"ideal {m['ideal'] * 1e3:7.1f} ms, ratio to the ideal {m['step'] / m['ideal']:.3f}")
    ratio_new, ratio_old = (med[n]["step"] / med[n]["ideal"] for n in ("new", "old"))
    print(f"  new / old: {med['new']['step'] / med['old']['step']:.3f} in step time, "
          f"{ratio_new / ratio_old:.3f} in ratio to the ideal")


if __name__ == "__main__":
    main()
