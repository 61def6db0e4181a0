"""cmgen.eval: FID/FD in several feature spaces, precision/recall, KID, SWD/MMD, rewards, NFE sweeps."""
from cmgen.eval.frechet import FeatureStats, fd_between, frechet_distance
from cmgen.eval.metrics import (kernel_inception_distance, mean_confidence_interval, mmd2_rbf, precision_recall,
                                sliced_wasserstein)

__all__ = ["FeatureStats", "fd_between", "frechet_distance", "kernel_inception_distance", "mean_confidence_interval",
           "mmd2_rbf", "precision_recall", "sliced_wasserstein"]
