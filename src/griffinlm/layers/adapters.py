"""Parameters as the fused ops must read them when `peft` has wrapped a layer with LoRA adapters.

`peft` (`get_peft_model`, `inject_adapter_in_model`) replaces a targeted `Linear` by a LoRA layer
whose forward is base(x) + scaling * B(A(dropout(x))), and wraps a module whose parameter is
targeted (`LoraConfig.target_parameters`: the RG-LRU's block-diagonal gate weights) in a
`ParamWrapper` that adds scaling * (B A) to the parameter during that module's forward only.
Calling a wrapped module is therefore always right; reading `.weight` is not (a LoRA layer's
`.weight` is its base weight). Every place that hands parameters to a fused op instead of calling
the module (the decoding step, folded biases) asks here: the base parameter with the active,
unmerged adapters' low-rank updates added (dropout is the identity outside training, where
these ops run).

Nothing here imports `peft`: a wrapped module is recognised by the attributes of peft's
`BaseTunerLayer` (`get_base_layer`, `lora_A`, `active_adapters`, `merged_adapters`).
"""
from __future__ import annotations

import torch
import torch.nn as nn


def is_adapter(module: nn.Module) -> bool:
    """True for a peft LoRA layer or parameter wrapper."""
    return hasattr(module, "lora_A") and hasattr(module, "get_base_layer")


def base_module(module: nn.Module) -> nn.Module:
    """The module under every adapter wrapper (itself when unwrapped)."""
    while is_adapter(module):
        module = module.base_layer
    return module


def _active(wrapper: nn.Module) -> list[str]:
    """Adapters whose update is not yet in the base parameter."""
    if wrapper.disable_adapters:
        return []
    return [a for a in wrapper.active_adapters if a in wrapper.lora_A and a not in wrapper.merged_adapters]


def is_plain_lora(wrapper: nn.Module, adapter: str) -> bool:
    """True when `adapter` on `wrapper` is plain LoRA (scaling * B A), not DoRA or another variant."""
    return not (getattr(wrapper, "use_dora", {}).get(adapter) or getattr(wrapper, "lora_variant", {}).get(adapter))


def _check_plain_lora(wrapper: nn.Module, adapter: str) -> None:
    if not is_plain_lora(wrapper, adapter):
        raise NotImplementedError(
            f"adapter {adapter!r} on {type(base_module(wrapper)).__name__} is a LoRA variant (e.g. DoRA) that the "
            "fused decoding ops cannot fold in; merge it first (model.merge_and_unload())")


def parameters(module: nn.Module, names: tuple[str, ...]) -> tuple[torch.Tensor | None, ...]:
    """`names` of the module under the wrappers, each with the low-rank updates of the active,
    unmerged adapters that target it added: a Linear's ("weight", "bias") (a LoRA layer's update
    scaling * B @ A is (out, in), like the weight; B's bias, with `lora_bias`, adds to the bias),
    or an RG-LRU's gate weights (H, bw, bw) targeted by a ParamWrapper. Unwrapped: the
    parameters themselves (no copy)."""
    deltas: dict[str, list[torch.Tensor]] = {}
    m = module
    with torch.no_grad():
        while is_adapter(m):
            target = getattr(m, "parameter_name", "weight")  # a ParamWrapper names its parameter
            for adapter in _active(m):
                _check_plain_lora(m, adapter)
                deltas.setdefault(target, []).append(m.get_delta_weight(adapter))
                b = m.lora_B[adapter]
                if target == "weight" and getattr(b, "bias", None) is not None:
                    deltas.setdefault("bias", []).append(b.bias * m.scaling[adapter])
            m = m.base_layer
    out = []
    for name in names:
        p = getattr(m, name)
        if p is not None and name in deltas:
            p = p.detach() + sum(d.to(p.dtype) for d in deltas[name])
        out.append(p)
    return tuple(out)


def linear_parameters(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (out, in), bias (out,) or None) of a possibly adapted Linear, as `parameters`."""
    weight, bias = parameters(module, ("weight", "bias"))
    return weight, bias


def adapters_in(root: nn.Module) -> list[nn.Module]:
    """The outermost adapter wrappers of a module tree (each covers the wrappers it nests)."""
    found, inner = [], set()
    for m in root.modules():
        if is_adapter(m) and id(m) not in inner:
            found.append(m)
            w = m.base_layer
            while is_adapter(w):
                inner.add(id(w))
                w = w.base_layer
    return found


def adapter_state(wrappers: list[nn.Module]) -> tuple:
    """A fingerprint of everything adapted parameters depend on beyond the module tree's objects:
    the versions of every tensor under each wrapper (an optimizer step updates adapter and base
    tensors in place, and an adapted parameter is a sum, not a view) and which adapters are
    active, merged or disabled. Empty for a model without adapters."""
    state = []
    for w in wrappers:
        state.append(tuple(p._version for p in w.parameters()))
        while is_adapter(w):
            state.append((w.disable_adapters, tuple(w.active_adapters), tuple(w.merged_adapters)))
            w = w.base_layer
    return tuple(state)
