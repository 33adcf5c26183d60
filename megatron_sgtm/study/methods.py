"""Study methods: the fixed base methods and the named entries a spec builds from them.

A spec's ``methods`` is either a list of base method names or a mapping of entry name ->
``MethodSpec``. Behaviour (label use, filtering, routing, ablation) follows an entry's base
``method``; rows, series and run ids carry the entry's name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, get_args

from ..moe_config import MoEConfig, MoEForget

StudyMethod = Literal["no_filter", "weak_filter", "strict_filter", "sgtm",
                      "gradient_routing", "activation_masking"]
BASE_METHODS = get_args(StudyMethod)
# Methods that train without labels: the undiscovered rate does not change them.
LABEL_FREE = ("no_filter",)
# Methods whose forget parameters are zeroed before evaluation.
ABLATED = ("sgtm", "gradient_routing", "activation_masking")
ROUTING_METHOD = {"sgtm": "sgtm", "gradient_routing": "gradient_routing",
                  "activation_masking": "activation_masking"}
Variant = Literal["default", "joint_projection", "joint_attention"]


@dataclass
class MethodSpec:
    """One named method entry. Unset partition keys fall back to the size's own."""

    # The base study method (None: the entry's name, which must then be a base method).
    method: Optional[StudyMethod] = None
    # Routing variant (sgtm only) and mask-embeddings (routing methods); see RoutingConfig.
    variant: Variant = "default"
    mask_embeddings: bool = False
    # The noise policy's retain-mode share of this entry's labels (None: the spec's).
    retain_mode_share: Optional[float] = None
    forget_heads: Optional[int] = None
    forget_mlp_units: Optional[int] = None
    # 0-based layers that carry forget units (None: every layer).
    layers: Optional[list[int]] = None
    # An MoE architecture on top of the size (model.moe: the size's MLPs become MoE blocks),
    # its forget experts per block and how forget tokens are routed (docs/moe.md). With every
    # block MoE, forget_mlp_units defaults to 0 (there is no dense MLP).
    moe: Optional[MoEConfig] = None
    forget_experts: Optional[int] = None
    moe_forget: MoEForget = "learned"

    @property
    def base(self) -> str:
        assert self.method is not None, "an unresolved MethodSpec"
        return self.method

    @property
    def routing_method(self) -> str:
        return ROUTING_METHOD.get(self.base, "none")

    def problems(self) -> list[str]:
        out = []
        if self.retain_mode_share is not None and not 0.0 <= self.retain_mode_share <= 1.0:
            out.append(f"retain_mode_share: {self.retain_mode_share} is not in [0, 1]")
        for key in ("forget_heads", "forget_mlp_units"):
            if (getattr(self, key) or 0) < 0:
                out.append(f"{key}: must be >= 0, got {getattr(self, key)}")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            out.append(f"layers: duplicate entries in {self.layers}")
        return out


def resolve(methods) -> dict[str, MethodSpec]:
    """Entry name -> MethodSpec with ``method`` filled in, in spec order. The list form means
    each name is its own base method with default settings. Unresolvable entries are left
    out (``entry_problems`` reports them)."""
    if isinstance(methods, dict):
        items = [(name, entry or MethodSpec()) for name, entry in methods.items()]
    else:
        items = [(name, MethodSpec()) for name in methods]
    out = {}
    for name, entry in items:
        base = entry.method or (name if name in BASE_METHODS else None)
        if base is not None:
            out[name] = MethodSpec(**{**vars(entry), "method": base})
    return out


def entry_problems(methods) -> list[str]:
    """Problems of the entries on their own: names, base methods, settings that contradict
    the base method. Size-dependent checks are in ``spec``."""
    out = []
    if not isinstance(methods, dict):
        dupes = sorted({m for m in methods if list(methods).count(m) > 1})
        if dupes:
            out.append(f"methods: duplicate entries {dupes}")
        return out
    for name, entry in methods.items():
        where = f"methods.{name}"
        entry = entry or MethodSpec()
        if not str(name) or any(c in str(name) for c in "/ \t"):
            out.append(f"{where}: an entry name must be non-empty, without '/' or spaces")
        base = entry.method or (name if name in BASE_METHODS else None)
        if base is None:
            out.append(f"{where}.method: required, as {name!r} is not a base method "
                       f"(one of {', '.join(BASE_METHODS)})")
            continue
        if name in BASE_METHODS and base != name:
            out.append(f"{where}.method: an entry named after base method {name} must be "
                       f"{name}, not {base}")
            continue
        if entry.variant != "default" and base != "sgtm":
            out.append(f"{where}.variant: {entry.variant!r} applies to method sgtm only, "
                       f"not {base}")
        if entry.mask_embeddings and base not in ROUTING_METHOD:
            out.append(f"{where}.mask_embeddings: needs a routing method "
                       f"({', '.join(ROUTING_METHOD)}), not {base}")
        if entry.retain_mode_share is not None and base in LABEL_FREE:
            out.append(f"{where}.retain_mode_share: {base} trains without labels")
        for key in ("forget_heads", "forget_mlp_units", "layers"):
            if getattr(entry, key) is not None and base not in ROUTING_METHOD:
                out.append(f"{where}.{key}: {base} has no forget units (a routing method has)")
        if entry.moe is None and (entry.forget_experts is not None or
                                  entry.moe_forget != "learned"):
            out.append(f"{where}: forget_experts and moe_forget need an moe architecture")
        if entry.moe_forget != "learned" and base != "sgtm":
            out.append(f"{where}.moe_forget: applies to method sgtm only, not {base}")
    return out


def base_of(row: dict) -> str:
    """A result row's base method (rows written before named entries carry only ``method``)."""
    return row.get("base_method") or row.get("method") or ""
