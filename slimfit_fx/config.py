"""SlimFitConfig: the user's knobs, validated once at construction.

A config is a frozen dataclass; a bad value raises here, naming the field, the
value and what is allowed, so nothing downstream has to re-check it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

SCHEDULES = ("manual", "ils")
COMPRESSION_KINDS = ("qkv", "softmax", "attention_out", "gelu_input", "gelu_output", "weight_input")
SCALES = ("fixed", "row")


@dataclass(frozen=True)
class CompressionConfig:
    """Bit width per kind of static activation (None keeps it in its own dtype),
    and the share of a frozen LayerNorm's normalized output kept (pruning).

    qkv: attention query/key/value; softmax: attention probabilities (saved by
    attention written out as matmul-softmax-matmul); attention_out: the output of
    a fused attention (scaled_dot_product_attention), which its backward reads
    instead of the probabilities; gelu_input / gelu_output: the FFN activation's
    input and output. layernorm_keep: for a
    LayerNorm whose weight is frozen, backward keeps only this share of each row
    of its normalized input (largest magnitudes, with their indices: int16 for
    rows of up to 32768, else int32), in (0, 1]; None keeps it whole. scale:
    "fixed" is the paper's power-of-two fixed point with no scale (Q3.4 for 8-bit
    signed, steps of 1/256 for softmax, 0.5 for 4-bit GELU input); "row" stores a
    per-row fp32 scale (finer, 4 more bytes per row).

    attention_out is not in the paper, whose models saved the probabilities:
    fused attention saves its output instead, a convex combination of V's rows,
    so "paper" stores it like V (8-bit Q3.4: the same range and step).

    weight_input: what the weight gradients of trainable layers read, the input
    of a trainable Linear/matmul (x in x^T @ grad_y) and the normalized input of
    a trainable LayerNorm. The paper quantizes one of these, the FFN output
    dense's input (gelu_output, which takes precedence); weight_input_bits
    extends that to every trainable layer, always with a per-row scale (the
    inputs of different layers have no common range for a fixed step). None in
    "paper" and "row"; 8 in "extended". It changes the trainable layers' own
    weight gradients, which the paper's formats (but for gelu_output) leave exact.

    pack_masks: boolean masks saved for backward (dropout's) are stored eight to
    a byte instead of one byte each. Lossless: backward multiplies by exactly
    the mask forward drew. Not in the paper; on in every preset but "off".
    """

    qkv_bits: int | None = 8
    softmax_bits: int | None = 8
    attention_out_bits: int | None = 8
    gelu_input_bits: int | None = 4
    gelu_output_bits: int | None = 8
    weight_input_bits: int | None = None
    scale: str = "fixed"
    layernorm_keep: float | None = 0.1
    pack_masks: bool = True

    def __post_init__(self) -> None:
        for kind in COMPRESSION_KINDS:
            bits = getattr(self, f"{kind}_bits")
            if bits is not None and (isinstance(bits, bool) or bits not in (4, 8)):
                raise ValueError(f"CompressionConfig.{kind}_bits must be 4, 8 or None, got {bits!r}")
        if self.scale not in SCALES:
            raise ValueError(f"CompressionConfig.scale must be one of {SCALES}, got {self.scale!r}")
        keep = self.layernorm_keep
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, (int, float))
                                 or not 0.0 < keep <= 1.0):
            raise ValueError(f"CompressionConfig.layernorm_keep must be None or in (0.0, 1.0], got {keep!r}")
        if not isinstance(self.pack_masks, bool):
            raise ValueError(f"CompressionConfig.pack_masks must be True or False, got {self.pack_masks!r}")

    @property
    def enabled(self) -> bool:
        return self.layernorm_keep is not None or self.pack_masks or any(
            self.bits_for(kind) is not None for kind in COMPRESSION_KINDS)

    def bits_for(self, kind: str) -> int | None:
        return getattr(self, f"{kind}_bits")


COMPRESSION_PRESETS = {
    "paper": CompressionConfig(),
    "row": CompressionConfig(scale="row"),
    "extended": CompressionConfig(weight_input_bits=8),
    "off": CompressionConfig(qkv_bits=None, softmax_bits=None, attention_out_bits=None,
                             gelu_input_bits=None, gelu_output_bits=None, layernorm_keep=None,
                             pack_masks=False),
}
BACKENDS = ("inductor", "aot_eager")


@dataclass(frozen=True)
class SlimFitConfig:
    """How slimfit_fx compiles and freezes a model.

    freeze_ratio: share of layers the scheduler freezes, in [0.0, 1.0]
        (0.0 freezes nothing).
    schedule: who picks the frozen set; "ils" (the default) is the
        training-dynamics scheduler (inter-layer scheduling), "manual" means
        `cm.slimfit.set_frozen`. To freeze nothing: freeze_ratio=0.0.
    backend: compiler for every variant, "inductor" or "aot_eager" (no codegen).
    reschedule_every: "ils" picks a new frozen set every this many optimizer
        steps; 1 (the default) is the paper's per-step scheduling. A new frozen
        set never compiles anything, so there is no compile cost to trade.
    seed: seeds the scheduler's initial random scores.
    compression: how static activations are stored between forward and backward:
        "paper" (the paper's formats), "row" (the same widths with per-row
        scales), "extended" ("paper" plus trainable layers' inputs 8-bit per-row,
        see CompressionConfig.weight_input_bits), "off", or a CompressionConfig.
    memory_budget: the partitioner's activation memory budget (torch's
        `activation_memory_budget`) for every variant, in (0.0, 1.0]: below 1.0
        it recomputes cheap activations in backward instead of saving them.
        None keeps torch's own setting (1.0 unless the user changed it).
    always_train: layer names (see `cm.slimfit.layers`) that "ils" never freezes,
        e.g. a freshly initialized classification head, which has no training
        dynamics to judge yet. They count among the layers that train, so the
        frozen share stays `freeze_ratio` of all layers where it can. Only with
        schedule="ils"; the paper's scheduler scores every layer alike, which is
        what the default () does.
    """

    freeze_ratio: float = 0.9
    schedule: str = "ils"
    backend: str = "inductor"
    reschedule_every: int = 1
    seed: int = 0
    compression: str | CompressionConfig = "paper"
    memory_budget: float | None = None
    always_train: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        ratio = self.freeze_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise TypeError(
                f"SlimFitConfig.freeze_ratio must be a float in [0.0, 1.0], got {ratio!r} "
                f"of type {type(ratio).__name__}"
            )
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"SlimFitConfig.freeze_ratio must be in [0.0, 1.0], got {ratio!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"SlimFitConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}"
            )
        if self.backend not in BACKENDS:
            raise ValueError(
                f"SlimFitConfig.backend must be one of {BACKENDS}, got {self.backend!r}"
            )
        _check_int("reschedule_every", self.reschedule_every, 1)
        _check_int("seed", self.seed, 0)
        if not isinstance(self.compression, CompressionConfig) and self.compression not in COMPRESSION_PRESETS:
            raise ValueError(
                f"SlimFitConfig.compression must be one of {tuple(COMPRESSION_PRESETS)} or a "
                f"CompressionConfig, got {self.compression!r}"
            )
        mb = self.memory_budget
        if mb is not None and (isinstance(mb, bool) or not isinstance(mb, (int, float))):
            raise TypeError(f"SlimFitConfig.memory_budget must be None or a float in (0.0, 1.0], "
                            f"got {mb!r} of type {type(mb).__name__}")
        if mb is not None and not 0.0 < mb <= 1.0:
            raise ValueError(f"SlimFitConfig.memory_budget must be None or in (0.0, 1.0], got {mb!r}")
        names = self.always_train
        if isinstance(names, (str, bytes)) or not isinstance(names, (tuple, list, set, frozenset)) \
                or not all(isinstance(n, str) for n in names):
            raise TypeError("SlimFitConfig.always_train must be a tuple of layer names (str), "
                            f"got {names!r:.80}")
        object.__setattr__(self, "always_train", tuple(sorted(set(names))))
        if self.always_train and self.schedule != "ils":
            raise ValueError(
                f"SlimFitConfig.always_train applies to schedule='ils', got schedule={self.schedule!r}; "
                "with schedule='manual' leave those layers out of cm.slimfit.set_frozen(...)")

    @property
    def compression_config(self) -> CompressionConfig:
        c = self.compression
        return c if isinstance(c, CompressionConfig) else COMPRESSION_PRESETS[c]

    def replace(self, **overrides) -> "SlimFitConfig":
        """A copy with `overrides` applied; unknown field names raise TypeError."""
        fields = {f.name for f in dataclasses.fields(self)}
        _refuse_removed(overrides)
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(
                f"unknown SlimFitConfig field(s) {unknown}; the fields are {sorted(fields)}"
            )
        return dataclasses.replace(self, **overrides)


# Fields of the per-frozen-set compiler, gone since one compile serves every set.
_REMOVED = {"max_variants", "new_set_every", "compile_budget"}


def _refuse_removed(fields) -> None:
    removed = sorted(_REMOVED & set(fields))
    if removed:
        raise TypeError(
            f"SlimFitConfig no longer has {removed}: slimfit_fx compiles each distinct region "
            "once and every frozen set runs on that code, so there is no per-set compile to "
            "bound; drop the argument (the schedule re-ranks layers after every optimizer step)")


def _check_int(field: str, value: object, least: int, none_ok: bool = False) -> None:
    allowed = f"an int >= {least}" + (" or None" if none_ok else "")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"SlimFitConfig.{field} must be {allowed}, got {value!r} of type {type(value).__name__}"
        )
    if value < least:
        raise ValueError(f"SlimFitConfig.{field} must be {allowed}, got {value!r}")
