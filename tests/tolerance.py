"""The project's tolerance rule for results checked against a float64 truth.

An implementation passes when its worst error against float64 is at most ``factor`` (2) times the worst error the
reference implementation (torch, in the same dtype) has against the same float64 truth, plus a floor of a few
units in the last place of the result's dtype (16 ulps of max(|truth|, 1)), so that a reference that happens to be exact does not demand
exactness. Fixed ``atol``/``rtol`` stay for comparisons between two implementations in the same dtype.
"""
from __future__ import annotations

import torch

FACTOR = 2.0
FLOOR_ULPS = 16  # of max(|truth|, 1) in the checked dtype: results that cancel to ~0 where the reference is exact


def reference_error(got: torch.Tensor, truth: torch.Tensor) -> float:
    """max |got - truth| over finite truth entries, in float64 (entries where truth is +-inf must match exactly)."""
    truth = truth.detach().double()
    got = got.detach().double()
    finite = torch.isfinite(truth)
    if not torch.equal(got[~finite], truth[~finite]):
        raise AssertionError("non-finite entries differ from the float64 truth")
    return (got[finite] - truth[finite]).abs().max().item() if finite.any() else 0.0


def assert_within_reference_error(got: torch.Tensor, reference: torch.Tensor, truth: torch.Tensor, *,
                                  factor: float = FACTOR, what: str = "") -> None:
    """``got`` (our kernel) and ``reference`` (torch, same dtype as ``got``) against ``truth`` (float64, same shape):
    error(got) <= factor * error(reference) + FLOOR_ULPS ulps of max|truth|."""
    assert got.shape == reference.shape == truth.shape, (got.shape, reference.shape, truth.shape)
    finite = truth[torch.isfinite(truth)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    floor = FLOOR_ULPS * torch.finfo(got.dtype).eps * max(scale, 1.0)
    err, ref_err = reference_error(got, truth), reference_error(reference, truth)
    bound = factor * ref_err + floor
    assert err <= bound, (f"{what}: max error {err:.3g} vs float64 exceeds {factor}x the reference's own error "
                          f"{ref_err:.3g} + floor {floor:.3g} = {bound:.3g}")
