"""How close a compressed run's gradients are to a reference (tests and benchmarks use it)."""
from __future__ import annotations

from collections.abc import Mapping

import torch


def gradient_fidelity(grads: Mapping[str, torch.Tensor | None],
                      ref_grads: Mapping[str, torch.Tensor | None]) -> tuple[float, float]:
    """Cosine and SQNR (dB) of every gradient, flattened into one vector in fp64,
    against `ref_grads`. Both map parameter names to gradients; the same names
    must be missing or None on both sides."""
    names = [n for n in ref_grads if ref_grads[n] is not None]
    got_names = [n for n in grads if grads[n] is not None]
    if sorted(got_names) != sorted(names):
        raise ValueError(f"gradients of different parameters: only in grads "
                         f"{sorted(set(got_names) - set(names))}, only in ref_grads "
                         f"{sorted(set(names) - set(got_names))}")
    got = torch.cat([grads[n].double().reshape(-1) for n in names])
    ref = torch.cat([ref_grads[n].double().reshape(-1) for n in names])
    cosine = torch.nn.functional.cosine_similarity(got, ref, dim=0).item()
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (got - ref).pow(2).sum().clamp_min(1e-300)).item()
    return cosine, sqnr
