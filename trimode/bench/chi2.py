"""Chi-square tests for sampling measurements (tests and scripts): is a histogram of sampled tokens the
target distribution, are two histograms the same distribution. No scipy needed."""

from __future__ import annotations

import torch


def chi2_sf(stat: float, df: int) -> float:
    """Survival function of the chi-square distribution: P(X >= stat), X ~ chi2(df)."""
    if df <= 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def chi2_goodness_of_fit(counts: torch.Tensor, probs: torch.Tensor, *, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson statistic and degrees of freedom of observed `counts` (V,) against `probs` (V,).

    Cells with expected count below `min_expected` are pooled into one cell (dropped if that pool is
    still below it, with its counts checked separately by the caller if it matters). An observation
    in a cell of probability 0 makes the statistic infinite.
    """
    counts = counts.to(torch.float64)
    probs = probs.to(torch.float64) / probs.sum()
    n = counts.sum()
    if bool(((probs == 0) & (counts > 0)).any()):
        return float("inf"), max(int((probs > 0).sum()) - 1, 1)
    exp = probs * n
    big = exp >= min_expected
    obs_cells = [counts[big]]
    exp_cells = [exp[big]]
    small_exp = exp[~big].sum()
    if small_exp >= min_expected:
        obs_cells.append(counts[~big].sum()[None])
        exp_cells.append(small_exp[None])
    o, e = torch.cat(obs_cells), torch.cat(exp_cells)
    if o.numel() < 2:
        return 0.0, 0
    # Rescale to the kept cells so dropped tiny cells do not bias the statistic.
    e = e * (o.sum() / e.sum())
    return float(((o - e) ** 2 / e).sum()), int(o.numel() - 1)


def chi2_two_sample(a: torch.Tensor, b: torch.Tensor, *, min_expected: float = 5.0) -> tuple[float, int]:
    """Chi-square test of homogeneity of two count vectors over the same categories (V,).

    Categories whose pooled expected count (under homogeneity) is below `min_expected` in either
    sample are pooled into one. Returns (statistic, degrees of freedom).
    """
    a, b = a.to(torch.float64), b.to(torch.float64)
    na, nb = a.sum(), b.sum()
    tot = a + b
    ea, eb = tot * na / (na + nb), tot * nb / (na + nb)
    big = (ea >= min_expected) & (eb >= min_expected)
    ca, cb = [a[big]], [b[big]]
    if bool((~big).any()):
        ca.append(a[~big].sum()[None])
        cb.append(b[~big].sum()[None])
    A, Bc = torch.cat(ca), torch.cat(cb)
    T = A + Bc
    keep = T > 0
    A, Bc, T = A[keep], Bc[keep], T[keep]
    if T.numel() < 2:
        return 0.0, 0
    EA, EB = T * na / (na + nb), T * nb / (na + nb)
    stat = ((A - EA) ** 2 / EA).sum() + ((Bc - EB) ** 2 / EB).sum()
    return float(stat), int(T.numel() - 1)


