"""Where a latent digits model loses quality, measured in FD-digits against the run's held-out split.

1. the decoder: the training latents plus Gaussian noise of std e, decoded (is the VAE the bottleneck?);
2. the model's one-step denoising of x0 + sigma z from the training latents (which noise levels are weak?);
3. the 2-step sampler's middle sigma (sigma_max -> S -> sigma_min), beside the 1-step row.

    python benchmarks/lct_digits_diagnostics.py runs/lct_digits [--n 1000] [--mids 0.05,0.529,1,2,20]
"""
import argparse
import dataclasses

import torch

from cmgen.data import _split, latent_dataset
from cmgen.eval.cli import run_splits, split_reference
from cmgen.eval.features import build_feature_net
from cmgen.eval.fid import MetricOptions, evaluate_model_steps, evaluate_source
from cmgen.eval.sources import dataset_source
from cmgen.runs import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--mids", default="0.05,0.529,1,2,20")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    gen = load_model(a.run).eval()
    r = gen.recipe
    net = build_feature_net("digits", tuple(gen.image_shape))
    opts = MetricOptions(keep=10000, k=3, kid_subsets=10, kid_subset_size=200, seed=0)
    ref = split_reference(run_splits(r, gen.codec)["holdout"], "holdout", net, opts, 256)
    train, _ = _split(latent_dataset(r.data.path), r.data.holdout, r.train.seed)
    x = train.x[:a.n].float()
    g = torch.Generator().manual_seed(0)

    def fd(latents) -> float:
        with torch.no_grad():
            images = torch.cat([gen.codec.decode(latents[i:i + 250]) for i in range(0, len(latents), 250)])
        return evaluate_source(dataset_source(images, "probe", "image", 250), net, ref, opts)["fd"]

    print("decoder: training latents + N(0, e^2), decoded")
    for e in (0.0, 0.1, 0.2, 0.3):
        print(f"  e {e:<5g} FD {fd(x + e * torch.randn(x.shape, generator=g)):.3f}")
    print("model: f(x0 + sigma z, sigma) of training latents, decoded")
    for s in (0.05, 0.2, 0.5, 1.0, 2.0):
        noisy = x + s * torch.randn(x.shape, generator=g)
        with torch.no_grad():
            out = torch.cat([gen.net(noisy[i:i + 250], torch.full((len(noisy[i:i + 250]),), s))
                             for i in range(0, len(noisy), 250)])
        print(f"  sigma {s:<5g} FD {fd(out):.3f}")
    print("sampler: 1 step, and 2 steps sigma_max -> S -> sigma_min")
    for k, s in enumerate(float(v) for v in a.mids.split(",")):
        gen.recipe = dataclasses.replace(r, sample=dataclasses.replace(r.sample, sigmas=(r.precond.sigma_max, s)))
        table = evaluate_model_steps(gen, [1, 2] if k == 0 else [2], a.n, net, ref, opts, seed=0, batch_size=256,
                                     progress=False)
        for row in table.rows:
            print(f"  steps {row['steps']} S {s:<6g} FD {row['fd']:.3f}")


if __name__ == "__main__":
    main()
