"""A/B of one CTM step's loss + backward in one process, on the same batches: the former loss (the adaptive
weight's gradient norm and the final backward each run through the target network theta-) against the
current one (one backward through theta- per term, then the surrogate <G(x_t, t, s), dL/dG>).

    python benchmarks/ctm_loss_ab.py runs/edm_digits      # the teacher run; 1 thread
"""
import sys
import tempfile
import time
from pathlib import Path

from cmgen.methods.ctm import DSM_WEIGHT_RANGE, adaptive_weight
from cmgen.recipe import load_recipe
from cmgen.train import Trainer, configure_threads

configure_threads(1)
r = load_recipe("ctm_digits", [f"method.teacher={sys.argv[1] if len(sys.argv) > 1 else 'runs/edm_digits'}"])
tr = Trainer(r, Path(tempfile.mkdtemp()), progress=False)
m, nets = tr.method, tr.nets


def old_loss(batch, step):
    est, tgt, _draws = m.estimate_and_target(nets, batch)
    l_ctm = m.distance(est, tgt).mean()
    l_dsm, _ = m.dsm(nets, batch)
    lam = adaptive_weight(l_ctm, l_dsm, m.layer, *DSM_WEIGHT_RANGE)
    return {"loss": l_ctm + lam * l_dsm}


def new_loss(batch, step):
    return m.loss(nets, batch, step)


def timed(fn, n=8):
    tot_loss = tot_bwd = 0.0
    for i in range(n):
        tr.step = 100 + i
        b = tr._batch(0)
        t0 = time.perf_counter(); out = fn(b, tr.step); t1 = time.perf_counter()
        out["loss"].backward(); t2 = time.perf_counter()
        tr.model.zero_grad(set_to_none=True)
        tot_loss += t1 - t0; tot_bwd += t2 - t1
    return tot_loss / n, tot_bwd / n


for rep in range(2):
    for name, fn in (("old", old_loss), ("new", new_loss)):
        a, b = timed(fn)
        print(f"{name}: loss {a:.3f}s backward {b:.3f}s total {a+b:.3f}s per step (batch {r.train.batch_size})")
