"""Which parameters are "layers" that freezing controls, and their names.

A layer, as in the method, is a parameter of rank >= 2 (Linear, Conv, Embedding
weights) or the weight of a normalization module; biases always train. This
module only reads the model; it never changes requires_grad.
"""
from __future__ import annotations

from collections.abc import Iterable

from torch import nn

_NORM_TYPES = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,
    getattr(nn, "RMSNorm", nn.LayerNorm),
)


def _is_norm(module: nn.Module) -> bool:
    # HF and timm define their own norms (LlamaRMSNorm, T5LayerNorm, LayerNorm2d...).
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith(("Norm", "Norm2d"))


def find_layers(model: nn.Module, requires_grad: bool = True) -> tuple[str, ...]:
    """Names of the layers of `model`, in `named_parameters()` order.

    Tied parameters count once, under the first name `named_parameters()` gives.
    Parameters with requires_grad=False are the user's own freezing and are left
    out; `requires_grad=False` lists those instead.
    """
    norm_weights = {
        id(module.weight)
        for module in model.modules()
        if _is_norm(module) and isinstance(getattr(module, "weight", None), nn.Parameter)
    }
    return tuple(
        name
        for name, param in model.named_parameters()
        if param.requires_grad == requires_grad and (param.dim() >= 2 or id(param) in norm_weights)
    )


def parameter_aliases(model: nn.Module) -> dict[str, str]:
    """Every parameter name, tied aliases included, mapped to its canonical name."""
    canonical: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases[name] = canonical.setdefault(id(param), name)
    return aliases


def resolve_names(
    names: Iterable[str], layers: tuple[str, ...], aliases: dict[str, str], who: str = "set_frozen"
) -> frozenset[str]:
    """Validate user-given layer names and map tied aliases to canonical names;
    `who` (the API that took them) heads the error messages."""
    if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
        raise TypeError(
            f"{who} expects an iterable of parameter names (e.g. a list or set), "
            f"got {type(names).__name__} {names!r:.80}"
        )
    layer_set = set(layers)
    resolved = set()
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{who}: parameter names must be str, got {name!r}")
        if name not in aliases:
            import difflib

            close = difflib.get_close_matches(name, aliases, n=3)
            hint = f" Did you mean {close}?" if close else ""
            raise KeyError(
                f"{who}: {name!r} is not a parameter of the model.{hint} "
                "The names freezing controls are in cm.slimfit.layers."
            )
        canonical = aliases[name]
        if canonical not in layer_set:
            raise ValueError(
                f"{who}: {name!r} is a parameter but not a layer: only weights of rank >= 2 "
                "and normalization weights can be frozen (biases always train, and parameters "
                "with requires_grad=False are already frozen). See cm.slimfit.layers."
            )
        resolved.add(canonical)
    return frozenset(resolved)


def parameter_names_by_identity(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> canonical name, to map graph inputs back to parameters."""
    return {id(p): name for name, p in model.named_parameters()}
