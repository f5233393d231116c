"""SlimFitConfig: the user's knobs, validated once at construction.

A config is a frozen dataclass; a bad value raises here, naming the field, the
value and what is allowed, so nothing downstream has to re-check it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .budget import parse_bytes
from .passes.compress.registry import KINDS, Kind, config_fields
from .policies import DEFAULT_POLICY, POLICIES, FreezePolicy, policy_type, schedule_name

SCHEDULES = tuple(POLICIES)
SCALES = ("fixed", "row")
NORM_GUARDS = ("blocks", "bypass", "none")
# CompressionConfig's per-kind fields and their "paper" values, from the kinds
# compress_saved knows; each field's format validates its values.
KIND_FIELDS: dict[str, int | float | None] = {name: paper for name, (paper, _) in config_fields().items()}
# the fields stored in the paper's fixed point, which scale="row" turns per-row
FIXED_POINT_FIELDS = tuple(name for name, (_, fmt) in config_fields().items() if fmt.name == "fixed_point")


def compression_config_class(kinds: tuple[Kind, ...] = KINDS) -> type:
    """The CompressionConfig dataclass for `kinds`: one field per kind's config
    field, validated by the kind's format (passes/compress/formats). slimfit_fx
    builds it once, for registry.KINDS."""
    fields = config_fields(kinds)

    def check(self) -> None:
        for name, (_, fmt) in fields.items():
            value = getattr(self, name)
            if value is not None:
                fmt.check(f"CompressionConfig.{name}", value)
        if self.scale not in SCALES:
            raise ValueError(f"CompressionConfig.scale must be one of {SCALES}, got {self.scale!r}")
        if self.norm_guard not in NORM_GUARDS:
            raise ValueError(f"CompressionConfig.norm_guard must be one of {NORM_GUARDS}, got {self.norm_guard!r}")
        if not isinstance(self.paper_formats, bool):
            raise ValueError(f"CompressionConfig.paper_formats must be True or False, got {self.paper_formats!r}")

    def enabled(self) -> bool:
        return any(getattr(self, name) not in (None, False) for name in fields)

    described = "\n".join(
        f"    {name} (paper: {paper}): " + " ".join(f"{k.name}: {k.why}" for k in kinds if k.field == name)
        for name, (paper, _) in fields.items())
    return dataclasses.make_dataclass(
        "CompressionConfig",
        [*((name, int | float | None, dataclasses.field(default=paper)) for name, (paper, _) in fields.items()),
         ("scale", str, dataclasses.field(default="fixed")),
         ("norm_guard", str, dataclasses.field(default="blocks")),
         ("paper_formats", bool, dataclasses.field(default=False))],
        frozen=True,

        namespace={
            "__module__": __name__,
            "__doc__": (
                "How each kind of static activation is stored between forward and backward;\n"
                "None keeps it in its own dtype. Defaults are the paper's widths (paper_formats: its formats too).\n\n"
                "scale: \"fixed\" is the paper's power-of-two fixed point with no scale (Q3.4 for\n"
                "8-bit signed, steps of 1/256 for softmax); \"row\" stores a per-row fp32 scale\n"
                "(finer, 4 more bytes per row). Kinds with no fixed format (weight inputs) always\n"
                "use a per-row scale. 4-bit GELU and SiLU inputs are stored as 16 intervals fitted\n"
                "to the activation's derivative (the paper has steps of 0.5 over [-4, 3.5]), under\n"
                "either scale: backward reads nothing else of them. A *_keep field prunes: backward keeps\n"
                "that share of each row (largest magnitudes, with int16 indices for rows of up to\n"
                "32768, else int32), in (0, 1].\n\n"
                "norm_guard: which frozen norms may be pruned. A pruned norm's input gradient is\n"
                "approximate; where the whole gradient of everything before it passes through\n"
                "that norm (a final norm right before the head or loss) nothing dilutes the\n"
                "error (a CLIP-style tower with its final LayerNorm pruned: gradient cosine\n"
                "0.68). \"blocks\" (default) prunes norms inside the repeated blocks only and\n"
                "keeps the embedding and final norms whole; \"bypass\" also keeps whole every\n"
                "norm whose input has no residual path around it (post-LN blocks such as BERT's,\n"
                "where the block's whole gradient passes through the norm); \"none\" prunes\n"
                "every frozen norm. Kept-whole norms are counted as\n"
                "kept_whole_<kind>_outside_blocks / kept_whole_<kind>_no_bypass.\n\n"
                "paper_formats: True stores the GELU and SiLU inputs and the GELU output in the\n"
                "paper's own fixed point (4-bit steps of 0.5; Q3.4) instead of derivative bins and\n"
                "float8 (same bytes, closer gradients); for reproducing the paper (preset\n"
                "\"paper-exact\").\n\n"
                + described),
            "__post_init__": check,
            "enabled": property(enabled),
        },
    )


CompressionConfig = compression_config_class()


COMPRESSION_PRESETS = {
    "paper": CompressionConfig(),
    "row": CompressionConfig(scale="row"),
    "extended": CompressionConfig(weight_input_bits=8),
    "norms-float8": CompressionConfig(layernorm_bits=8),
    "paper-exact": CompressionConfig(paper_formats=True),
    "off": CompressionConfig(**dict.fromkeys(KIND_FIELDS)),
}
# Frozen norms in float8 rather than pruned: on the main job's task (BBC News, 7
# seeds) +0.19 ± 0.12 points against the paper's pruning, on digits +2.94 ± 0.62;
# gradient SQNR 36.1 against 32.8 dB for 2% more saved bytes (MiniLM); and no
# per-row top-k, which on a CPU was a tenth of a small model's step (docs/design.md).
DEFAULT_COMPRESSION = "norms-float8"
BACKENDS = ("inductor", "aot_eager")
OPTIMIZER_STATES = ("full", "bf16", "int8", "offload")


@dataclass(frozen=True)
class SlimFitConfig:
    """How slimfit_fx compiles and freezes a model.

    freeze_ratio: share of the layers that can train (those an optimizer that
        stepped holds; see `cm.slimfit.not_scheduled`) that "ils" freezes, in
        [0.0, 1.0]; 0.0 freezes nothing. None (the default) is 0.9 under
        "ils". schedule="manual" takes none: `set_frozen` picks the set, so a
        ratio given with it is refused rather than ignored; so does "lisa".
    schedule: who picks the frozen set: a registered name or a FreezePolicy
        object (slimfit_fx/policies). "ils" (the default) is the paper's
        training-dynamics scheduler (inter-layer scheduling), "manual" means
        `cm.slimfit.set_frozen` (nothing frozen until it is called), "lisa" is
        LISA with its defaults (pass `slimfit_fx.LISA(layers=k, interval=K)` for
        others).
    backend: compiler for every region, "inductor" or "aot_eager" (no codegen).
    reschedule_every: "ils" picks a new frozen set every this many optimizer
        steps; 1 (the default) is the paper's per-step scheduling. A new frozen
        set never compiles anything, so there is no compile cost to trade.
        Only for a schedule named by a name whose policy reads it ("ils").
    seed: seeds the scheduler's initial random scores ("ils" only, like
        reschedule_every; a policy object takes its seed as an argument).
    compression: how static activations are stored between forward and backward:
        "norms-float8" (the default: the paper's widths, with frozen norms'
        x_hat in float8 instead of the paper's top 10%, see
        CompressionConfig.layernorm_bits), "paper" (the paper's widths and its
        norm pruning), "paper-exact" (its formats too: see
        CompressionConfig.paper_formats), "row" ("paper" with per-row scales),
        "extended" ("paper" plus trainable layers' inputs 8-bit per-row, see
        CompressionConfig.weight_input_bits), "off", or a CompressionConfig
        (whose defaults are "paper").
    memory_budget: total training memory to fit in, in bytes: an int or a
        string with a unit ("16GiB", "2GB", "512MiB"; B, KB, MB, GB, TB are
        powers of 1000, KiB, MiB, GiB, TiB of 1024). At the first training
        forward, when shapes are known, slimfit predicts the peak (weights,
        gradients of the layers that train, optimizer state, the compiled
        regions' saved bytes, a runtime overhead; slimfit_fx/budget.py) and
        picks the lowest freeze ratio (up to 0.95) and, where that is not
        enough, the optimizer-state packing that fits; a budget below what fits
        at 0.95 frozen with the strongest packing raises, stating that floor.
        `cm.slimfit.report()` shows predicted vs measured peak. Only with a
        schedule that takes a freeze_ratio ("ils"), and instead of one. None
        (the default) fits nothing.
    activation_memory_budget: the partitioner's activation memory budget
        (torch's `activation_memory_budget`) for every region, in (0.0, 1.0]:
        below 1.0 it recomputes cheap activations in backward instead of saving
        them. None keeps torch's own setting (1.0 unless the user changed it).
        A fraction, not a size: it is relative to what the partition would
        save, and total peak is not monotonic in it.
    always_train: layer names (see `cm.slimfit.layers`) that the schedule never
        freezes, e.g. a freshly initialized classification head, which has no
        training dynamics to judge yet. They count among the layers that train,
        so the frozen share stays `freeze_ratio` of all layers where it can. Not
        with schedule="manual"; the paper's scheduler scores every layer alike,
        which is what the default () does.
    blocks: the repeated blocks (transformer layers) that become regions, each
        compiled once and shared by its copies: qualified module names
        ("encoder.layer.3"), patterns ("encoder.layer.*") or module classes.
        None (the default) finds them: children of a ModuleList/Sequential that
        share a class. () compiles the whole model as one region, on purpose.
    optimizer_state: how the optimizer state of layers frozen for the next step
        is held (torch.optim Adam/AdamW moments and SGD momentum): "int8" (the
        default) packs it blockwise in 8 bits (one float32 scale per 256
        elements: exp_avg as sign and log magnitude, exp_avg_sq as its square
        root on a log scale, SGD momentum linear; tensors under 4,096 elements
        stay plain); "bf16" casts it to bfloat16; "full" leaves it as the
        optimizer keeps it (lossless); "offload" moves it to pinned host memory (CUDA models only).
        A layer's state is unpacked before the optimizer step it trains in;
        `optimizer.state_dict()` returns it plain. Under FSDP2 (`fully_shard`)
        each rank packs its own shard of the state. See `cm.slimfit.optimizer_state_bytes`.
    """

    freeze_ratio: float | None = None
    schedule: str | FreezePolicy = DEFAULT_POLICY
    backend: str = "inductor"
    reschedule_every: int = 1
    seed: int = 0
    compression: str | CompressionConfig = DEFAULT_COMPRESSION
    memory_budget: int | str | None = None
    activation_memory_budget: float | None = None
    always_train: tuple[str, ...] = ()
    blocks: tuple[str | type, ...] | None = None
    optimizer_state: str = "int8"

    def __new__(cls, *args: object, **fields: object) -> "SlimFitConfig":
        # Before dataclass's __init__, whose "unexpected keyword argument" names no fix.
        _refuse_unknown(fields)
        return super().__new__(cls)

    def __post_init__(self) -> None:
        if isinstance(self.schedule, str) and self.schedule not in POLICIES:
            raise ValueError(
                f"SlimFitConfig.schedule must be one of {SCHEDULES} or a FreezePolicy object "
                f"(slimfit_fx.policies.FreezePolicy), got {self.schedule!r}")
        if not isinstance(self.schedule, (str, FreezePolicy)):
            raise TypeError(
                f"SlimFitConfig.schedule must be one of {SCHEDULES} or a FreezePolicy object; "
                f"{type(self.schedule).__name__} lacks what a FreezePolicy has (name, "
                "observes_weight_change, choose, state_dict, load_state_dict)")
        policy = policy_type(self.schedule)
        refuses = getattr(policy, "refuses", {})
        ratio = self.freeze_ratio
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))):
            raise TypeError(
                f"SlimFitConfig.freeze_ratio must be a float in [0.0, 1.0], got {ratio!r} "
                f"of type {type(ratio).__name__}"
            )
        if ratio is not None and not 0.0 <= ratio <= 1.0:
            raise ValueError(f"SlimFitConfig.freeze_ratio must be in [0.0, 1.0], got {ratio!r}")
        if ratio is not None and "freeze_ratio" in refuses:
            raise ValueError(refuses["freeze_ratio"].format(value=ratio))
        # Not a field: whether freeze_ratio was left to its default, so replace() can
        # switch such a config to schedule='manual'.
        object.__setattr__(self, "_ratio_defaulted", ratio is None)
        if ratio is None and getattr(policy, "default_freeze_ratio", None) is not None:
            object.__setattr__(self, "freeze_ratio", policy.default_freeze_ratio)
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
        amb = self.activation_memory_budget
        if amb is not None and (isinstance(amb, bool) or not isinstance(amb, (int, float))):
            raise TypeError(f"SlimFitConfig.activation_memory_budget must be None or a float in (0.0, 1.0], "
                            f"got {amb!r} of type {type(amb).__name__}")
        if amb is not None and not 0.0 < amb <= 1.0:
            raise ValueError(f"SlimFitConfig.activation_memory_budget must be None or in (0.0, 1.0], "
                             f"got {amb!r}")
        if self.memory_budget is not None:
            object.__setattr__(self, "memory_budget", parse_bytes(self.memory_budget, "SlimFitConfig.memory_budget"))
            if getattr(policy, "default_freeze_ratio", None) is None:
                raise ValueError(
                    f"SlimFitConfig.memory_budget={self.memory_budget!r} fits the run by choosing the freeze "
                    f"ratio, which schedule={schedule_name(self.schedule)!r} does not take. Fix: use "
                    "schedule='ils' with memory_budget, or drop memory_budget")
            if not self._ratio_defaulted:
                raise ValueError(
                    f"SlimFitConfig.memory_budget={self.memory_budget!r} chooses the freeze ratio itself, so "
                    f"freeze_ratio={ratio!r} would be overruled. Fix: drop one of them")
        names = self.always_train
        if isinstance(names, (str, bytes)) or not isinstance(names, (tuple, list, set, frozenset)) \
                or not all(isinstance(n, str) for n in names):
            raise TypeError("SlimFitConfig.always_train must be a tuple of layer names (str), "
                            f"got {names!r:.80}")
        object.__setattr__(self, "always_train", tuple(sorted(set(names))))
        blocks = self.blocks
        if blocks is not None:
            if isinstance(blocks, (str, bytes, type)) or not isinstance(blocks, (tuple, list, set, frozenset)) \
                    or not all(isinstance(b, str) or (isinstance(b, type) and issubclass(b, torch.nn.Module))
                               for b in blocks):
                raise TypeError(
                    "SlimFitConfig.blocks must be a tuple of module names, name patterns (str) or "
                    f"torch.nn.Module classes, e.g. blocks=('encoder.layer.*',); got {blocks!r:.80}")
            object.__setattr__(self, "blocks", tuple(blocks))
        if self.always_train and "always_train" in refuses:
            raise ValueError(refuses["always_train"].format(value=self.always_train))
        # A policy object was built with its options; only a name's from_config reads these.
        read = getattr(policy, "config_fields", ()) if isinstance(self.schedule, str) else ()
        for field, default in (("reschedule_every", 1), ("seed", 0)):
            value = getattr(self, field)
            if value != default and field not in read:
                where = (f"schedule={self.schedule!r} does not read it" if isinstance(self.schedule, str)
                         else f"the {type(self.schedule).__name__} object takes its options as arguments")
                raise ValueError(
                    f"SlimFitConfig.{field}={value!r} has no effect with schedule="
                    f"{schedule_name(self.schedule)!r}: {where}. Fix: drop {field}"
                    + ("" if isinstance(self.schedule, str) else " and pass it to the policy object"))
        if not isinstance(self.optimizer_state, str) or self.optimizer_state not in OPTIMIZER_STATES:
            raise ValueError(
                f"SlimFitConfig.optimizer_state must be one of {OPTIMIZER_STATES}, got "
                f"{self.optimizer_state!r}: \"full\" keeps frozen layers' optimizer state as is, "
                "\"bf16\" and \"int8\" pack it, \"offload\" moves it to pinned host memory")

    @property
    def compression_config(self) -> CompressionConfig:
        c = self.compression
        return c if isinstance(c, CompressionConfig) else COMPRESSION_PRESETS[c]

    def replace(self, **overrides) -> "SlimFitConfig":
        """A copy with `overrides` applied; unknown field names raise TypeError.
        A freeze_ratio left to its default stays a default (so
        `SlimFitConfig().replace(schedule="manual")` holds)."""
        _refuse_unknown(overrides)
        if self._ratio_defaulted and "freeze_ratio" not in overrides:
            overrides = {**overrides, "freeze_ratio": None}
        return dataclasses.replace(self, **overrides)


# Fields of the per-frozen-set compiler, gone since one compile serves every set.
_REMOVED = {"max_variants", "new_set_every", "compile_budget"}


def _refuse_unknown(fields) -> None:
    removed = sorted(_REMOVED & set(fields))
    if removed:
        raise TypeError(
            f"SlimFitConfig no longer has {removed}: slimfit_fx compiles each distinct region "
            "once and every frozen set runs on that code, so there is no per-set compile to "
            "bound; drop the argument (the schedule re-ranks layers after every optimizer step)")
    known = {f.name for f in dataclasses.fields(SlimFitConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TypeError(f"unknown SlimFitConfig field(s) {unknown}; the fields are {sorted(known)}")


def _check_int(field: str, value: object, least: int, none_ok: bool = False) -> None:
    allowed = f"an int >= {least}" + (" or None" if none_ok else "")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"SlimFitConfig.{field} must be {allowed}, got {value!r} of type {type(value).__name__}"
        )
    if value < least:
        raise ValueError(f"SlimFitConfig.{field} must be {allowed}, got {value!r}")
