"""Frechet distance between Gaussians fitted to two feature sets (the FID formula on any features)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg

from difflab.errors import DifflabError

_MAX_IMAGINARY = 1e-3


def _as_float64(array: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    return np.asarray(array, dtype=np.float64)


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and covariance (d, d) (unbiased, rowvar=False), float64, of features (N, d) with N >= 2."""
    x = _as_float64(features)
    if x.ndim != 2:
        raise DifflabError(f"features must be a 2-D array (N, d), got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise DifflabError(f"need at least 2 samples to estimate a covariance, got {x.shape[0]}; pass more")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
) -> float:
    """Frechet distance of N(mu1, S1) and N(mu2, S2) (Dowson & Landau 1982; Heusel et al. 2017, Sec. 3).

    d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}); mu (d,), S (d, d). As in pytorch-fid, the square
    root is ``scipy.linalg.sqrtm``; if it is not finite (singular product) eps * I is added to both
    covariances, and a negligible imaginary part from round-off is dropped (a large one raises ValueError).
    """
    mu1, mu2 = np.atleast_1d(_as_float64(mu1)), np.atleast_1d(_as_float64(mu2))
    sigma1, sigma2 = np.atleast_2d(_as_float64(sigma1)), np.atleast_2d(_as_float64(sigma2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            "Frechet distance needs means of shape (d,) and covariances (d, d) of one d; got "
            f"{mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}"
        )
    diff = mu1 - mu2
    with warnings.catch_warnings():  # a singular product is expected for few samples; handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        largest = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if largest > _MAX_IMAGINARY:
            raise ValueError(f"matrix square root has a large imaginary component ({largest:.3g})")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_distance_between(features_a: np.ndarray | torch.Tensor, features_b: np.ndarray | torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to features_a (N, d) and features_b (M, d)."""
    mu_a, sigma_a = feature_statistics(features_a)
    mu_b, sigma_b = feature_statistics(features_b)
    return frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
