"""Mutation testing of the formulas: plant one wrong formula at a time, run the tests that should see it.

    OMP_NUM_THREADS=2 .venv/bin/python tools/mutate.py [--only NAME...] [--timeout 240]

Each mutant replaces one exact snippet of a source file (operator swap, constant change, dropped
no_grad/detach, sign flip, a draw that ignores its key...), runs the test files listed for that
module with `pytest -x`, and restores the file. It works on a private copy of the checkout (git's
tracked and untracked files, imported first through PYTHONPATH), so the checkout itself is never
touched. A mutant is killed when a test fails or the run times out; the score is killed / total.
Survivors are printed: each is a missing test or an equivalent mutant (EQUIVALENT, with the reason).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# the tests written against the mutants run last: with -x, a mutant an older test kills never reaches
# them, so one run scores the suite with them ("after") and without them ("before")
NEW = ("tests/test_mutants.py", "tests/test_scale.py")
CORE = ["tests/test_formulas.py", "tests/test_ict.py", "tests/test_ict_pinned.py", "tests/test_mutants.py"]
SAMPLING = ["tests/test_sampling.py", "tests/test_edm_flow.py", "tests/test_mutants.py"]
TESTS = {
    "cmgen/precond.py": CORE + ["tests/test_edm_flow.py"],
    "cmgen/schedules.py": CORE,
    "cmgen/losses.py": CORE,
    "cmgen/methods/ict.py": CORE,
    "cmgen/ema.py": CORE + ["tests/test_protocol.py"],
    "cmgen/rng.py": CORE + ["tests/test_scale.py::test_keyed_draws_are_the_same_for_any_process_count_and_on_resume",
                            "tests/test_scale.py::test_cpu_draws_are_those_of_a_cpu_generator_keyed_by_seed_step_and_draw"],
    "sampling/multistep.py": SAMPLING,
    "sampling/edm.py": SAMPLING,
    "sampling/flow.py": SAMPLING,
    "sampling/generate.py": SAMPLING,
}


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str


M = Mutant
MUTANTS = [
    # preconditioning (CM eq. 7, EDM Table 1, c_noise convention)
    M("c_skip: sigma_min shift dropped", "cmgen/precond.py", "((sigma - sigma_min) ** 2 + sigma_data**2)", "(sigma ** 2 + sigma_data**2)"),
    M("c_out: sign of the shift", "cmgen/precond.py", "(sigma - sigma_min) * sigma_data /", "(sigma + sigma_min) * sigma_data /"),
    M("c_in: sigma_data squared dropped", "cmgen/precond.py", "1.0 / (sigma**2 + sigma_data**2) ** 0.5", "1.0 / (sigma**2 + sigma_data) ** 0.5"),
    M("c_noise: 250 -> 1000", "cmgen/precond.py", "250.0 * torch.log(sigma + 1e-44)", "1000.0 * torch.log(sigma + 1e-44)"),
    M("edm c_out: sqrt dropped", "cmgen/precond.py", "sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5", "sigma * sigma_data / (sigma**2 + sigma_data**2)"),
    M("edm loss weight inverted", "cmgen/precond.py", "(sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2", "(sigma * sigma_data) ** 2 / (sigma**2 + sigma_data**2)"),
    M("cm denoiser: backbone sees x, not c_in x", "cmgen/precond.py", "self.backbone((c_in(s, cfg.sigma_data) * x32)", "self.backbone((x32)"),
    # schedules (EDM eq. 5, iCT eq. 7, lognormal index draw)
    M("karras grid: rho ignored", "cmgen/schedules.py", "return ((lo + i / (n - 1) * (hi - lo)) ** rho).to(dtype)", "return ((lo + i / (n - 1) * (hi - lo)) ** 7.0).to(dtype)"),
    M("karras grid: n instead of n - 1", "cmgen/schedules.py", "i / (n - 1) * (hi - lo)", "i / n * (hi - lo)"),
    M("curriculum: + 1 dropped", "cmgen/schedules.py", "return min(s0 * 2 ** (step // k_prime), s1) + 1", "return min(s0 * 2 ** (step // k_prime), s1)"),
    M("curriculum: stage length off by one", "cmgen/schedules.py", "math.log2(math.floor(s1 / s0)) + 1))", "math.log2(math.floor(s1 / s0))))"),
    M("index probs: P_mean sign", "cmgen/schedules.py", "(torch.log(s) - p_mean)", "(torch.log(s) + p_mean)"),
    M("index probs: not normalised", "cmgen/schedules.py", "return mass / mass.sum()", "return mass"),
    # losses
    M("pseudo-Huber: - c dropped", "cmgen/losses.py", "return torch.sqrt(sq + c * c) - c", "return torch.sqrt(sq + c * c)"),
    M("pseudo-Huber: c not squared", "cmgen/losses.py", "torch.sqrt(sq + c * c)", "torch.sqrt(sq + c)"),
    M("huber c: 0.00054 -> 0.0054", "cmgen/losses.py", "0.00054 * math.sqrt(dim)", "0.0054 * math.sqrt(dim)"),
    # iCT wiring
    M("ict: teacher not under stop-gradient", "cmgen/methods/ict.py", "with torch.no_grad(), same_dropout(rng.dropout_seed, x.device):", "with same_dropout(rng.dropout_seed, x.device):"),
    M("ict: teacher and student levels swapped", "cmgen/methods/ict.py", "sigma_t = sigmas[i].to(", "sigma_t = sigmas[i + 1].to("),
    M("ict: lambda = sigma_{i+1} - sigma_i", "cmgen/methods/ict.py", "weight = 1.0 / (sigmas[i + 1] - sigmas[i])", "weight = (sigmas[i + 1] - sigmas[i])"),
    M("ict: index draw ignores the lognormal probs", "cmgen/methods/ict.py", "i = rng.multinomial(probs).cpu()", "i = rng.multinomial(torch.ones_like(probs)).cpu()"),
    M("ict: default c not the iCT one", "cmgen/methods/ict.py", "else ict_huber_c(math.prod(gen.shape))", "else ict_huber_c(1)"),
    M("ict: teacher dropout not shared", "cmgen/methods/ict.py", "        with same_dropout(rng.dropout_seed, x.device):\n            pred", "        with same_dropout(rng.dropout_seed + 1, x.device):\n            pred"),
    M("ict: student noise independent of teacher noise", "cmgen/methods/ict.py", "pred = model(x + sigma_s.view(view) * z,", "pred = model(x + sigma_s.view(view) * torch.randn_like(z),"),
    M("ict: loss weight dropped", "cmgen/methods/ict.py", "\"loss\": (p.weight * dist).mean()", "\"loss\": dist.mean()"),
    M("ict: curriculum K from the stored config ignored", "cmgen/methods/ict.py", "self.total_steps = self.cfg.total_steps or recipe.train.steps", "self.total_steps = recipe.train.steps"),
    # EMA
    M("ema: does not move", "cmgen/ema.py", "torch._foreach_lerp_(self.shadow, params, 1.0 - (self.decay if decay is None else decay))", "pass"),
    M("ema: moves the wrong way (weight = decay)", "cmgen/ema.py", "params, 1.0 - (self.decay if decay is None else decay))", "params, (self.decay if decay is None else decay))"),
    M("target network: decay inverted", "cmgen/ema.py", "for p, q in zip(theirs, ours)], 1.0 - self.decay_at(step))", "for p, q in zip(theirs, ours)], self.decay_at(step))"),
    # keyed RNG
    M("rng: draws ignore the step", "cmgen/rng.py", "keyed_generator(self.seed, self.step, *self.stream, \"draw\", self._draws, device=self.device)", "keyed_generator(self.seed, *self.stream, \"draw\", self._draws, device=self.device)"),
    M("rng: every draw of a step the same", "cmgen/rng.py", "        self._draws += 1\n", ""),
    M("rng: slice ignores the offset", "cmgen/rng.py", "return t[self.offset:self.offset + self.count]", "return t[:self.count]"),
    M("rng: dropout seed ignores the step", "cmgen/rng.py", "key_seed(seed, step, \"dropout\", *dropout_key)", "key_seed(seed, \"dropout\", *dropout_key)"),
    M("rng: epoch permutation ignores the epoch", "cmgen/rng.py", "keyed_generator(seed, \"epoch\", epoch))", "keyed_generator(seed, \"epoch\", 0))"),
    # samplers
    M("multistep: no clamping", "sampling/multistep.py", "            x = x.clamp(-1, 1)\n", "            pass\n"),
    M("multistep: sigma_min not subtracted", "sampling/multistep.py", "(sigma**2 - sigma_min**2) ** 0.5 * z", "sigma * z"),
    M("multistep: same noise every step", "sampling/multistep.py", "        z = noise(k)\n", "        z = noise(0)\n"),
    M("heun: no second-order correction", "sampling/edm.py", "            x_next = x + (t_next - t_hat) * (0.5 * d + 0.5 * d_next)", "            pass"),
    M("heun: correction weights", "sampling/edm.py", "(0.5 * d + 0.5 * d_next)", "(0.25 * d + 0.75 * d_next)"),
    M("euler (edm): sign of the step", "sampling/edm.py", "x = x + (t_next - t) * (x - denoised) / t", "x = x - (t_next - t) * (x - denoised) / t"),
    M("flow euler: sign of the step", "sampling/flow.py", "x = x + (t_next - t) * v(x, t)", "x = x - (t_next - t) * v(x, t)"),
    M("flow sde: std without sqrt", "sampling/flow.py", "std = sig * math.sqrt(-dt)", "std = sig * (-dt)"),
    M("generate: image seed ignores its index", "sampling/generate.py", "noise = per_image_noise((seed + idx).tolist(), gen.shape, device)", "noise = per_image_noise([seed] * len(idx), gen.shape, device)"),
]

# mutants that change no observable behaviour, with the reason (checked by hand)
EQUIVALENT: dict[str, str] = {}


def private_copy() -> Path:
    """The checkout's files in a temporary folder, with cmgen.sampling/eval/recipes laid out as imported."""
    import shutil
    import tempfile

    dst = Path(tempfile.mkdtemp(prefix="cmgen-mutate-"))
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    for rel in listed:
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    for pkg, folder in (("sampling", "sampling"), ("eval", "eval"), ("recipes", "recipes")):
        (dst / "cmgen" / pkg).symlink_to(dst / folder, target_is_directory=True)
    return dst


def run_one(m: Mutant, timeout: int, python: str, root: Path) -> tuple[str, float]:
    path = root / m.file
    original = path.read_text()
    count = original.count(m.old)
    if count != 1:
        return f"snippet found {count} times (update the mutant)", 0.0
    path.write_text(original.replace(m.old, m.new))
    # CMGEN_TEST_THREADS=2: the pinned iCT checksums were taken at two threads (they differ at one)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(root), CMGEN_TEST_THREADS="2")
    t0 = time.time()
    try:
        proc = subprocess.run([python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--timeout", str(timeout),
                               *TESTS[m.file]], cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0:
            status = "survived"
        else:
            failed = re.search(r"^FAILED (\S+?)::", proc.stdout, re.M)
            status = f"killed by {failed.group(1) if failed else 'an error'}"
    except subprocess.TimeoutExpired:
        status = "killed (timeout)"
    finally:
        path.write_text(original)
    return status, time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="run the mutants whose name contains one of these words")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per mutant (a timeout counts as killed)")
    ap.add_argument("--exclude", nargs="*", default=[], help="leave out test entries containing these words "
                    "(e.g. the tests added since, to score the suite as it was)")
    ap.add_argument("--shard", default="0/1", help="K/N: run every N-th mutant from the K-th (parallel runs)")
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    args = ap.parse_args(argv)
    import signal

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))  # restore, then stop
    chosen = [m for m in MUTANTS if not args.only or any(w in m.name for w in args.only)]
    k, n = map(int, args.shard.split("/"))
    chosen = chosen[k::n]
    for f in TESTS:
        TESTS[f] = [t for t in TESTS[f] if not any(w in t for w in args.exclude)]
    if args.list:
        for m in chosen:
            print(f"{m.file:24s} {m.name}")
        return 0
    root = private_copy()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(root), CMGEN_TEST_THREADS="2")
    probe = subprocess.run([sys.executable, "-c", "import cmgen.rng, cmgen.sampling; print(cmgen.rng.__file__, "
                            "cmgen.sampling.__file__)"], cwd=root, env=env, capture_output=True, text=True)
    if not all(p.startswith(str(root)) for p in probe.stdout.split()):
        print(f"the copy {root} is not what python imports ({probe.stdout.strip()} {probe.stderr[-300:]})")
        return 1
    baseline = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                               *sorted({f for m in chosen for f in TESTS[m.file]})], cwd=root, env=env,
                              capture_output=True, text=True)
    if baseline.returncode != 0:
        print("the unmutated code fails its tests; fix that first:\n" + baseline.stdout[-2000:])
        return 1
    survivors, killed, killed_before, t0 = [], 0, 0, time.time()
    for k, m in enumerate(chosen, 1):
        status, secs = run_one(m, args.timeout, sys.executable, root)
        print(f"[{k:2d}/{len(chosen)}] {status:40s} {secs:5.0f}s  {m.file}: {m.name}", flush=True)
        if status.startswith("killed"):
            killed += 1
            if not any(status.endswith(t) for t in NEW):
                killed_before += 1
            else:
                print(f"        (survives the suite without {', '.join(NEW)})")
        else:
            survivors.append((m, status))
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    print(f"\nmutation score: {killed}/{len(chosen)} killed ({100 * killed / max(1, len(chosen)):.0f}%) "
          f"in {time.time() - t0:.0f}s; without {', '.join(NEW)}: {killed_before}/{len(chosen)}")
    for m, status in survivors:
        note = EQUIVALENT.get(m.name)
        print(f"  SURVIVED ({status}) {m.file}: {m.name}" + (f"  [equivalent: {note}]" if note else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
