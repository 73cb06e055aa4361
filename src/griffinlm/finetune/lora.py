"""LoRA adapters through `peft` on our `LanguageModel`: settings, checks, merging, peft-format files.

`apply_lora` is `peft.get_peft_model` with our defaults (every linear layer of the three block
kinds; the RG-LRU's block-diagonal gates on request, through peft's `target_parameters`), after
checks that fail before any training: a target that matches nothing, a rank larger than a
layer, options peft cannot honour on a parameter target. The layers honour adapters on every
fast path (`layers.adapters`); `merge_lora` folds them in and returns a plain model.

Adapter files are peft's own (`adapter_config.json` + `adapter_model.safetensors`). For a model
that `griffinlm convert --to-hf` can export (Griffin and Hawk shapes), module and parameter names
are RecurrentGemma's, so `PeftModel.from_pretrained(exported_transformers_model, adapter_dir)`
loads them; other models keep our names.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from ..layers.adapters import base_module, is_adapter
from ..model import LanguageModel

# Every linear layer of the three block kinds: recurrent block, attention, MLP (gated or plain).
RECURRENT_TARGETS = ("linear_y", "linear_x", "linear_out")
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = RECURRENT_TARGETS + ATTENTION_TARGETS + MLP_TARGETS
# The RG-LRU's block-diagonal gate weights (H, bw, bw): one rank-r update per block.
GATE_TARGETS = ("gate_r_weight", "gate_i_weight")
_HF_GATE_NAMES = {"gate_r_weight": "recurrent_gate_weight", "gate_i_weight": "input_gate_weight"}
ADAPTER_NAME = "default"


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA fine-tuning needs peft: pip install 'griffinlm[finetune]'") from None
    return peft


@dataclass
class LoraSettings:
    """LoRA hyper-parameters: rank r, alpha (updates scaled by alpha / r), dropout on the adapter
    input, the targeted module names (suffixes of module paths, as peft matches them; None:
    every linear layer of `DEFAULT_TARGETS` the model has), and whether the RG-LRU gate weights
    are adapted too (peft's parameter LoRA: dropout must be 0)."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] | None = None
    gates: bool = False
    seed: int = field(default=0, repr=False)  # the adapters' initialisation

    def __post_init__(self) -> None:
        self.targets = None if self.targets is None else tuple(self.targets)
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be at least 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.targets is not None and not self.targets and not self.gates:
            raise ValueError("LoRA needs at least one target module (targets=...) or gates=true")
        if self.gates and self.dropout:
            raise ValueError("LoRA on the RG-LRU gates (gates=true) needs dropout=0: peft's parameter LoRA "
                             "has no dropout")

    @classmethod
    def parse(cls, spec: str | None) -> "LoraSettings":
        """From "r=16,alpha=32,dropout=0.05,targets=q_proj+v_proj,gates=true" (any subset; targets
        joined by '+', "all" for the default list)."""
        kw: dict = {}
        for item in filter(None, (spec or "").split(",")):
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not sep:
                raise ValueError(f"--lora: expected KEY=VALUE, got {item!r}")
            if key == "r":
                kw["r"] = int(value)
            elif key in ("alpha", "dropout"):
                kw[key] = float(value)
            elif key == "targets":
                kw["targets"] = None if value == "all" else tuple(t for t in value.split("+") if t)
            elif key == "gates":
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(f"--lora: gates must be true or false, got {value!r}")
                kw["gates"] = value.lower() in ("true", "1")
            else:
                raise ValueError(f"--lora: unknown key {key!r}; expected r, alpha, dropout, targets, gates")
        return cls(**kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = None if self.targets is None else list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoraSettings":
        return cls(**d)

    def resolved_targets(self, model: nn.Module) -> tuple[str, ...]:
        """The targeted module names: as given, or the default ones `model` has."""
        if self.targets is not None:
            return self.targets
        leaves = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        return tuple(t for t in DEFAULT_TARGETS if t in leaves)

    def peft_config(self, model: nn.Module, fused: bool = False):
        """The `peft.LoraConfig` of these settings for `model`; `fused`: our linear layers get
        `FusedLoraLinear` (peft's LoRA Linear with a fused forward) instead of peft's."""
        peft = _peft()
        config = peft.LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                                 target_modules=list(self.resolved_targets(model)),
                                 target_parameters=list(GATE_TARGETS) if self.gates else None)
        if fused:
            from ..layers.linear import Linear
            from .fused_lora import FusedLoraLinear

            config._register_custom_module({Linear: FusedLoraLinear})
        return config


def check_targets(model: LanguageModel, settings: LoraSettings) -> None:
    """ValueError, before anything is built, for a target that matches no module of `model`, one
    that matches a module that is not a Linear, or a rank larger than a targeted layer."""
    names = {name: m for name, m in model.named_modules()}
    problems = []
    for target in settings.resolved_targets(model):
        hits = [m for name, m in names.items() if name == target or name.endswith("." + target)]
        if not hits:
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in names.items() if isinstance(m, nn.Linear)})
            problems.append(f"target module {target!r} matches nothing in this model (its linear layers: "
                            f"{', '.join(leaves)})")
            continue
        for m in hits:
            if not isinstance(m, nn.Linear):
                problems.append(f"target module {target!r} matches a {type(m).__name__}, not a linear layer")
                break
            if settings.r > min(m.in_features, m.out_features):
                problems.append(f"LoRA rank {settings.r} is larger than target {target!r} "
                                f"({m.in_features} -> {m.out_features}); use r <= "
                                f"{min(m.in_features, m.out_features)}")
                break
    if settings.gates:
        lrus = [m for m in names.values() if hasattr(m, "gate_r_weight")]
        if not lrus:
            problems.append("gates=true but the model has no RG-LRU (no recurrent blocks)")
        elif settings.r > lrus[0].gate_r_weight.shape[-1]:
            problems.append(f"LoRA rank {settings.r} is larger than the RG-LRU gate blocks "
                            f"({lrus[0].gate_r_weight.shape[-1]} wide)")
    if problems:
        raise ValueError("; ".join(problems))


def apply_lora(model: LanguageModel, settings: LoraSettings, fused: bool = True):
    """`peft.get_peft_model(model, settings.peft_config(model))` after `check_targets`; the base
    parameters are frozen (only adapters train). The adapters' B factors start at zero (peft's
    default), so the adapted model starts equal to `model`. `fused`: the linear layers' adapters
    run through `ops.lora_linear` (`FusedLoraLinear`; peft's own layer otherwise, as a plain
    `get_peft_model` call gives). Returns the PeftModel; `model` itself is modified in place (its
    targeted layers are wrapped) and is the PeftModel's base model."""
    check_targets(model, settings)
    peft = _peft()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        return peft.get_peft_model(model, settings.peft_config(model, fused=fused))


def set_dropout_stream(model: nn.Module, stream: int | None) -> None:
    """Makes the fused adapters' dropout masks of this process independent of those of processes
    with another `stream` (a data-parallel rank: all ranks draw the same seeds from one RNG state).
    Without a call (or with None) the stream is the process's torch.distributed rank, 0 outside one."""
    from .fused_lora import FusedLoraLinear

    for m in model.modules():
        if isinstance(m, FusedLoraLinear):
            m.dropout_stream = stream


def language_model(model: nn.Module) -> LanguageModel:
    """Our LanguageModel inside a PeftModel (or the model itself)."""
    while not isinstance(model, LanguageModel):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "model"):
            model = model.model
        else:
            raise TypeError(f"no LanguageModel inside {type(model).__name__}")
    return model


def has_adapters(model: nn.Module) -> bool:
    return any(is_adapter(m) for m in model.modules())


def merge_lora(model: nn.Module) -> LanguageModel:
    """A plain LanguageModel with every adapter folded into its base weights (peft's
    merge_and_unload; the wrappers are removed)."""
    if hasattr(model, "merge_and_unload"):
        merged = model.merge_and_unload()
    else:
        merged = model
    merged = language_model(merged)
    if has_adapters(merged):
        raise RuntimeError("adapters are left after merging")
    return merged


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors by peft's saved names (adapter name removed, our module paths)."""
    if not hasattr(model, "peft_config"):
        raise TypeError("adapter_tensors needs the PeftModel that apply_lora returned")
    return {k: v.detach() for k, v in _peft().get_peft_model_state_dict(model).items()}


# -- peft-format files -----------------------------------------------------------------------------
_PEFT_PREFIX = "base_model.model."


def _hf_module_path(ours: str) -> str:
    """Our module path -> the exported RecurrentGemma's (`interop.weights.hf_name` on modules)."""
    from ..interop.weights import hf_name

    return hf_name(ours + ".weight")[0][: -len(".weight")]


def exportable_to_hf(config) -> bool:
    """True when `griffinlm convert --to-hf` can write this model (RecurrentGemma's shapes)."""
    from ..interop.hf_config import model_config_to_hf

    try:
        model_config_to_hf(config)
    except (ValueError, KeyError):
        return False
    return True


def _renest_gate(wrapper: nn.Module, rest: str, to_hf: bool) -> str:
    """The key suffix `rest` ("base_layer." * depth + "lora_A.weight") of a gate adapter on our
    RG-LRU `wrapper`, re-nested between our wrappers' order (recurrence gate innermost) and the
    order peft nests them on RecurrentGemma's module (its parameters' declaration order: input
    gate innermost); `to_hf` gives the direction."""
    depth = 0
    while rest.startswith("base_layer."):
        rest, depth = rest[len("base_layer."):], depth + 1
    ours = []  # outermost first, under RecurrentGemma's names
    while is_adapter(wrapper):
        ours.append(_HF_GATE_NAMES[wrapper.parameter_name])
        wrapper = wrapper.base_layer
    hf = [n for n in ("recurrent_gate_weight", "input_gate_weight") if n in ours]  # outermost first
    new_depth = hf.index(ours[depth]) if to_hf else ours.index(hf[depth])
    return "base_layer." * new_depth + rest


def save_adapter(model: nn.Module, out_dir: str, *, hf_names: bool | None = None,
                 base_name: str | None = None) -> str:
    """Writes the adapters of a PeftModel in peft's format to `out_dir`; with `hf_names` (default:
    when the model can be exported to RecurrentGemma) under the exported model's names.
    Returns `out_dir`."""
    from ..checkpoint import write_json_durable
    from safetensors.torch import save_file

    lm = language_model(model)
    if hf_names is None:
        hf_names = exportable_to_hf(lm.config)
    tensors = adapter_tensors(model)
    cfg = model.peft_config[ADAPTER_NAME].to_dict()
    if hf_names:
        renamed = {}
        for key, t in tensors.items():
            path = key[len(_PEFT_PREFIX):]
            m = re.match(r"(blocks\.\d+\.(?:temporal|mlp)\.[a-z_]+)\.(.*)", path)
            if m is None or not (m.group(1).endswith(".rg_lru") or m.group(1).rsplit(".", 1)[-1] in DEFAULT_TARGETS):
                raise ValueError(f"no RecurrentGemma name for adapter tensor {key!r}")
            module, rest = m.group(1), m.group(2)
            if module.endswith(".rg_lru"):
                rest = _renest_gate(lm.get_submodule(module), rest, to_hf=True)
            renamed[_PEFT_PREFIX + _hf_module_path(module) + "." + rest] = t
        tensors = renamed
        if cfg.get("target_parameters"):
            cfg["target_parameters"] = [_HF_GATE_NAMES[p] for p in cfg["target_parameters"]]
    cfg["base_model_name_or_path"] = base_name
    for k, v in list(cfg.items()):
        if isinstance(v, set):
            cfg[k] = sorted(v)
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, os.path.join(out_dir, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    write_json_durable(os.path.join(out_dir, "adapter_config.json"), cfg)
    return out_dir


def describe(model: nn.Module) -> str:
    """'N adapter parameters (x% of M) in K layers' for logs."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    layers = sum(1 for m in model.modules() if is_adapter(m) and not is_adapter(getattr(m, "base_layer", None)))
    kinds = sorted({type(base_module(m)).__name__ for m in model.modules() if is_adapter(m)})
    return (f"LoRA: {trainable:,} trainable parameters ({100 * trainable / max(total, 1):.2f}% of {total:,}) "
            f"in {layers} wrapped layers ({', '.join(kinds)})")


def _our_module_path(hf: str) -> str:
    """RecurrentGemma's module path -> ours (the inverse of `_hf_module_path`)."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(temporal_block|mlp_block)\.([a-z_]+)", hf)
    if m is None:
        raise ValueError(f"no griffinlm module for RecurrentGemma module {hf!r}")
    return f"blocks.{m.group(1)}.{'temporal' if m.group(2) == 'temporal_block' else 'mlp'}.{m.group(3)}"


def load_adapter(model: LanguageModel, adapter_dir: str):
    """Applies the peft-format adapter in `adapter_dir` (ours, or one trained with transformers +
    peft on a RecurrentGemma: its module names are mapped back) to `model`; returns the PeftModel.
    ValueError for an adapter that does not fit (names or shapes, named)."""
    from safetensors.torch import load_file

    peft = _peft()
    try:
        with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
            cfg = json.load(f)
        tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{adapter_dir} is not a readable peft adapter: {e}") from None
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{adapter_dir}: only LoRA adapters load here, got peft_type {cfg.get('peft_type')!r}")
    hf_named = any(k.startswith(_PEFT_PREFIX + "model.layers.") for k in tensors)
    gates = [{v: k for k, v in _HF_GATE_NAMES.items()}.get(p, p) for p in cfg.get("target_parameters") or []]
    targets = cfg.get("target_modules") or []
    settings = LoraSettings(r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0)),
                            targets=tuple(sorted(targets)) if isinstance(targets, list) else None, gates=bool(gates))
    if cfg.get("use_rslora") or cfg.get("use_dora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{adapter_dir}: rsLoRA, DoRA and per-layer ranks are not supported here")
    peft_model = apply_lora(model, settings)
    if hf_named:
        renamed = {}
        for key, t in tensors.items():
            m = re.match(r"(model\.layers\.\d+\.(?:temporal_block|mlp_block)\.[a-z_]+)\.(.*)", key[len(_PEFT_PREFIX):])
            if m is None:
                raise ValueError(f"{adapter_dir}: no griffinlm module for adapter tensor {key!r}")
            ours, rest = _our_module_path(m.group(1)), m.group(2)
            if ours.endswith(".rg_lru"):
                rest = _renest_gate(model.get_submodule(ours), rest, to_hf=False)
            renamed[_PEFT_PREFIX + ours + "." + rest] = t
        tensors = renamed
    result = peft.set_peft_model_state_dict(peft_model, tensors)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"{adapter_dir} does not fit the model: unexpected {result.unexpected_keys[:4]}, "
                         f"missing {missing[:4]}")
    return peft_model
