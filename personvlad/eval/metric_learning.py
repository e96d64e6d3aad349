"""Supervised metric learning on top of fixed descriptors: XQDA and KISSME.

Both are written from the papers' formulas with numpy / scipy.linalg:

* **KISSME** (Koestinger et al., "Large Scale Metric Learning from Equivalence
  Constraints", CVPR 2012): with ``Sigma_S`` / ``Sigma_D`` the covariances of
  the pairwise differences ``x_i - x_j`` of similar / dissimilar pairs, the
  log-likelihood-ratio test gives ``M = inv(Sigma_S) - inv(Sigma_D)``, which is
  projected onto the PSD cone by clipping negative eigenvalues to 0;
  ``d(x, z) = (x - z)^T M (x - z)``.
* **XQDA** (Liao et al., "Person Re-identification by Local Maximal Occurrence
  Representation and Metric Learning", CVPR 2015): with ``Sigma_I`` /
  ``Sigma_E`` the intra- / extra-personal difference covariances, the
  projection ``W`` (``d x r``) holds the top-``r`` generalised eigenvectors of
  ``Sigma_E w = lambda Sigma_I w``; in the projected space
  ``Sigma_I' = W^T Sigma_I W``, ``Sigma_E' = W^T Sigma_E W`` and
  ``M = inv(Sigma_I') - inv(Sigma_E')``;
  ``d(x, z) = (x - z)^T W M W^T (x - z)``.  By default ``r`` is the number of
  eigenvalues larger than 1 (as in the authors' code), which keeps ``M`` PSD.

Pair covariances are computed in closed form over *all* ordered pairs of the
training set (the same-label pairs are the similar / intrapersonal ones, all
other pairs the dissimilar / extrapersonal ones), in ``O(n d^2)``, instead of
sampling pairs.  Both covariances get a ridge ``reg * trace(Sigma)/d * I``
(``reg`` is relative to the mean variance, so it does not depend on the scale
of the features).

High-dimensional descriptors (e.g. 16,384-d) are first reduced by PCA, fitted
on the training features: ``pca_dim="auto"`` reduces to 256 dimensions when the
input has more than 256 (capped at ``n_train - 1``), ``None`` disables PCA and
an int forces that dimension.
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np

PcaDim = Union[int, str, None]


def _check_fit_inputs(features, labels):
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features: expected a 2-D (n, D) array, got shape {x.shape}")
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"labels: expected a 1-D array of length {x.shape[0]} (one per feature row), "
                         f"got shape {y.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features: contains NaN or inf")
    _, inv, counts = np.unique(y, return_inverse=True, return_counts=True)
    if (counts >= 2).sum() < 1:
        raise ValueError("labels: need at least one label with two or more samples (similar pairs)")
    if counts.shape[0] < 2:
        raise ValueError("labels: need at least two distinct labels (dissimilar pairs)")
    return x, inv.reshape(-1), counts


def pair_covariances(x: np.ndarray, inv: np.ndarray, counts: np.ndarray):
    """Covariances of the differences over all ordered same-label / different-label pairs.

    ``sum_{i,j same} (x_i - x_j)(x_i - x_j)^T = 2 sum_k (n_k X_k^T X_k - s_k s_k^T)``
    with ``s_k`` the sum of class ``k``; the all-pairs sum is
    ``2 (n X^T X - s s^T)``; the different-label sum is the difference.
    """
    n, d = x.shape
    k = counts.shape[0]
    sums = np.zeros((k, d))
    np.add.at(sums, inv, x)
    w = counts[inv].astype(np.float64)  # n_k of each sample's class
    xtx_w = (x * w[:, None]).T @ x      # sum_k n_k X_k^T X_k
    intra = 2.0 * (xtx_w - sums.T @ sums)
    s = x.sum(0)
    total = 2.0 * (n * (x.T @ x) - np.outer(s, s))
    extra = total - intra
    n_intra = float((counts * (counts - 1)).sum())
    n_extra = float(n * (n - 1)) - n_intra
    if n_intra <= 0 or n_extra <= 0:
        raise ValueError("labels: need both same-label and different-label pairs")
    intra /= n_intra
    extra /= n_extra
    return (intra + intra.T) / 2.0, (extra + extra.T) / 2.0


def _ridge(c: np.ndarray, reg: float) -> np.ndarray:
    d = c.shape[0]
    scale = np.trace(c) / d if np.trace(c) > 0 else 1.0
    return c + (reg * scale) * np.eye(d)


# Beyond this condition number a covariance's inverse is noise in float64
# (np.linalg.inv returns it anyway, without an error).
_MAX_COND = 1e12


def _check_cond(c: np.ndarray, what: str, reg: float) -> np.ndarray:
    cond = np.linalg.cond(c)
    if not np.isfinite(cond) or cond > _MAX_COND:
        raise ValueError(f"reg: {what} is singular or nearly so (condition number {cond:.3g}) with reg={reg:g}; "
                         "expected reg > 0 (the default is 1e-3) or more samples than dimensions")
    return c


def _inv(c: np.ndarray, what: str, reg: float) -> np.ndarray:
    return np.linalg.inv(_check_cond(c, what, reg))


class _PCA:
    """PCA fitted on the training features (exact eigh or randomised SVD)."""

    def __init__(self, dim: int, seed: int = 0):
        self.dim = int(dim)
        self.seed = seed

    def fit(self, x: np.ndarray) -> "_PCA":
        self.mean_ = x.mean(0)
        xc = x - self.mean_
        n, d = xc.shape
        k = self.dim
        if min(n, d) <= 4 * k or min(n, d) <= 1024:
            if d <= n:
                evals, evecs = np.linalg.eigh(xc.T @ xc)
                comps = evecs[:, ::-1][:, :k]
            else:  # Gram trick: eigenvectors of X X^T mapped back
                evals, u = np.linalg.eigh(xc @ xc.T)
                evals, u = evals[::-1][:k], u[:, ::-1][:, :k]
                comps = xc.T @ u / np.sqrt(np.maximum(evals, 1e-12))[None, :]
        else:  # randomised range finder (Halko et al.) with power iterations
            rng = np.random.default_rng(self.seed)
            q = xc @ rng.standard_normal((d, k + 16))
            for _ in range(4):
                q, _ = np.linalg.qr(q)
                q = xc @ (xc.T @ q)
            q, _ = np.linalg.qr(q)
            _, _, vt = np.linalg.svd(q.T @ xc, full_matrices=False)
            comps = vt[:k].T
        self.components_ = np.ascontiguousarray(comps)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean_) @ self.components_


class _QuadraticMetric:
    """Shared machinery: optional PCA, then ``d(x, z) = (x-z)^T A (x-z)``."""

    def __init__(self, reg: float = 1e-3, pca_dim: PcaDim = "auto", seed: int = 0):
        if not (isinstance(reg, (int, float)) and reg >= 0):
            raise ValueError(f"reg: expected a float >= 0, got {reg!r}")
        if not (pca_dim is None or pca_dim == "auto" or (isinstance(pca_dim, (int, np.integer)) and pca_dim > 0)):
            raise ValueError(f"pca_dim: expected None, 'auto' or a positive int, got {pca_dim!r}")
        self.reg = float(reg)
        self.pca_dim = pca_dim
        self.seed = seed
        self.pca_: Optional[_PCA] = None
        self.proj_: Optional[np.ndarray] = None   # (d', r) projection applied after PCA
        self.kernel_: Optional[np.ndarray] = None  # (r, r) M

    def _fit_pca(self, x: np.ndarray) -> np.ndarray:
        n, d = x.shape
        if self.pca_dim is None:
            return x
        if self.pca_dim == "auto":
            if d <= 256:
                self.pca_ = None
                return x
            k = min(256, n - 1)
        else:
            k = min(int(self.pca_dim), d, max(n - 1, 1))
        self.pca_ = _PCA(k, self.seed).fit(x)
        return self.pca_.transform(x)

    def _embed(self, x) -> np.ndarray:
        if self.kernel_ is None:
            raise RuntimeError(f"{type(self).__name__}: call fit() before distance()/transform()")
        x = np.asarray(x, dtype=np.float64)
        if self.pca_ is not None:
            x = self.pca_.transform(x)
        return x @ self.proj_

    def transform(self, x) -> np.ndarray:
        """Features mapped into the learned subspace (PCA, then the projection)."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.in_dim_:
            raise ValueError(f"x: expected shape (n, {getattr(self, 'in_dim_', '?')}), got {x.shape}")
        return self._embed(x)

    def distance(self, qf, gf) -> np.ndarray:
        """``(Q, G)`` learned distances ``(q - g)^T A (q - g)``, computed in float64 and
        returned as float32 (half the memory for MARS-sized matrices; ranking-safe)."""
        if self.kernel_ is None:
            raise RuntimeError(f"{type(self).__name__}: call fit() before distance()")
        q = np.asarray(qf, dtype=np.float64)
        g = np.asarray(gf, dtype=np.float64)
        for name, a in (("qf", q), ("gf", g)):
            if a.ndim != 2 or a.shape[1] != self.in_dim_:
                raise ValueError(f"{name}: expected shape (n, {self.in_dim_}) (the fitted feature dimension), "
                                 f"got {a.shape}")
        u, v = self._embed(q), self._embed(g)
        m = self.kernel_
        um, vm = u @ m, v @ m
        d = (um * u).sum(1)[:, None] + (vm * v).sum(1)[None, :] - 2.0 * (um @ v.T)
        return d.astype(np.float32)


class KISSME(_QuadraticMetric):
    """KISSME metric: ``M = inv(Sigma_S) - inv(Sigma_D)``, clipped to PSD.

    ``fit(features (n, D), labels (n,))`` then ``distance(qf, gf)``.
    """

    def fit(self, features, labels) -> "KISSME":
        x, inv, counts = _check_fit_inputs(features, labels)
        self.in_dim_ = x.shape[1]
        z = self._fit_pca(x)
        s_sim, s_dis = pair_covariances(z, inv, counts)
        m = (_inv(_ridge(s_sim, self.reg), "the same-identity covariance", self.reg)
             - _inv(_ridge(s_dis, self.reg), "the different-identity covariance", self.reg))
        m = (m + m.T) / 2.0
        evals, evecs = np.linalg.eigh(m)
        evals = np.clip(evals, 0.0, None)
        self.kernel_ = (evecs * evals) @ evecs.T
        self.proj_ = np.eye(z.shape[1])
        return self


class XQDA(_QuadraticMetric):
    """XQDA metric (Liao et al. 2015).

    Args:
        dim: subspace dimension ``r``; ``None`` = number of generalised
            eigenvalues ``> 1`` (at least 1), as in the authors' code.
        reg: ridge on ``Sigma_I`` (and ``Sigma_E``), relative to the mean variance.
        pca_dim: see the module docstring.
    """

    def __init__(self, dim: Optional[int] = None, reg: float = 1e-3, pca_dim: PcaDim = "auto", seed: int = 0):
        super().__init__(reg=reg, pca_dim=pca_dim, seed=seed)
        if dim is not None and not (isinstance(dim, (int, np.integer)) and dim > 0):
            raise ValueError(f"dim: expected None or a positive int, got {dim!r}")
        self.dim = dim

    def fit(self, features, labels) -> "XQDA":
        import scipy.linalg

        x, inv, counts = _check_fit_inputs(features, labels)
        self.in_dim_ = x.shape[1]
        z = self._fit_pca(x)
        s_i, s_e = pair_covariances(z, inv, counts)
        s_i = _check_cond(_ridge(s_i, self.reg), "the same-identity covariance", self.reg)
        s_e = _ridge(s_e, self.reg)
        # generalised symmetric-definite problem  S_E w = lambda S_I w  (ascending)
        evals, evecs = scipy.linalg.eigh(s_e, s_i)
        evals, evecs = evals[::-1], evecs[:, ::-1]
        r = int((evals > 1).sum()) if self.dim is None else int(self.dim)
        r = max(1, min(r, z.shape[1]))
        w = evecs[:, :r]
        si_p = w.T @ s_i @ w
        se_p = w.T @ s_e @ w
        m = _inv(si_p, "the projected same-identity covariance", self.reg) - _inv(
            se_p, "the projected different-identity covariance", self.reg)
        self.eigenvalues_ = evals
        self.proj_ = w
        self.kernel_ = (m + m.T) / 2.0
        return self


METRIC_LEARNERS = {"xqda": XQDA, "kissme": KISSME}


def build_metric(name: str, **kwargs):
    """``build_metric("xqda"|"kissme", **kwargs)`` -> unfitted learner."""
    if name not in METRIC_LEARNERS:
        raise ValueError(f"name: expected one of {sorted(METRIC_LEARNERS)}, got {name!r}")
    return METRIC_LEARNERS[name](**kwargs)
