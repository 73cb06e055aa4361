"""Training checkpoints: safe formats, atomic writes, verified reads.

A checkpoint is a directory `RUN/checkpoints/step_XXXXXXXX/` with
  config.json          the ModelConfig (`ModelConfig.to_dict()`)
  model.safetensors    the weights (a LoRA fine-tuning run: its adapters only; trainer.json names
                       the base checkpoint they apply to)
  state.safetensors    optimizer moments and RNG states (tensors only; nothing is pickled)
  trainer.json         step, training settings, optimizer hyper-parameters, data position, python
                       and numpy RNG scalars, and a manifest (size + sha256) of the three files above.
It is written into a temporary sibling directory, every file fsynced, then renamed into place:
a run killed at any moment leaves either the complete checkpoint or none (plus a stale temporary
directory that the next save removes). trainer.json is written last, so a directory without it is
never read as a checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .config import ModelConfig

_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_TENSOR_FILES = ("config.json", "model.safetensors", "state.safetensors")
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt, or does not match what it is loaded into."""


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("checkpoints need the `safetensors` package: pip install 'griffinlm[train]'") from None
    return st


def file_sha256(path: str) -> str:
    """Hex sha256 of a file (the manifest's checksum)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_json_durable(path: str, obj: Any) -> None:
    """Writes JSON and fsyncs it (a checkpoint's trainer.json)."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# --- RNG and optimizer state as tensors + JSON -------------------------------------------------
def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Current torch / CUDA / numpy / python RNG states as (tensors, JSON-safe scalars)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    py = random.getstate()
    scalars = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [py[0], list(py[1]), py[2]]}
    return tensors, scalars


def set_rng_state(tensors: dict[str, torch.Tensor], scalars: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    kind, pos, has_gauss, gauss = scalars["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, gauss_next = scalars["python"]
    random.setstate((version, tuple(state), gauss_next))


def _optimizer_to_parts(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            tensors[f"optim.{idx}.{key}"] = value.detach().contiguous().cpu()
    return tensors, sd["param_groups"]


def _optimizer_from_parts(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    # JSON turned tuples (betas) into lists; give the optimizer back what it saved
    groups = [{k: tuple(v) if isinstance(v, list) and k not in ("params", "names") else v
               for k, v in g.items()} for g in groups]
    return {"state": state, "param_groups": groups}


# --- saving -------------------------------------------------------------------------------------
def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def save_checkpoint(run_dir: str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict, keep_last: int = 3, only: Sequence[str] | None = None) -> str:
    """Writes checkpoint `step` atomically, then keeps only the newest `keep_last`. Returns its path.

    trainer_state: JSON-safe dict (training config, data position, metrics so far).
    only: the state-dict names to store (a LoRA run's adapters; the frozen base is recorded
        by reference in trainer_state); None: all of them.
    """
    st = _safetensors()
    root = checkpoint_dir(run_dir)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step:08d}")
    tmp = os.path.join(root, f".tmp-step_{step:08d}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write_json_durable(os.path.join(tmp, "config.json"), model.config.to_dict())
    save_weights_file(model, os.path.join(tmp, "model.safetensors"), only)
    opt_tensors, groups = _optimizer_to_parts(optimizer)
    rng_tensors, rng_scalars = rng_state()
    st.save_file({**opt_tensors, **rng_tensors}, os.path.join(tmp, "state.safetensors"))
    for name in ("model.safetensors", "state.safetensors"):
        _fsync_file(os.path.join(tmp, name))
    manifest = {name: {"bytes": os.path.getsize(os.path.join(tmp, name)), "sha256": file_sha256(os.path.join(tmp, name))}
                for name in _TENSOR_FILES}
    write_json_durable(os.path.join(tmp, "trainer.json"), {
        "format": FORMAT_VERSION, "step": step, "optimizer_param_groups": groups, "rng": rng_scalars,
        "manifest": manifest, **trainer_state})
    _fsync_dir(tmp)
    if os.path.exists(final):  # re-saving a step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for name in os.listdir(root):  # temporaries left by killed runs
        if name.startswith(".tmp-") and not name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return final


def save_model_checkpoint(run_dir: str, step: int, model: torch.nn.Module, trainer_state: dict) -> str:
    """A checkpoint of `model` alone (a converted or merged model: no optimizer state, the only
    checkpoint kept in `run_dir`), loadable wherever a training checkpoint is. Returns its path."""
    # an SGD over no parameters records nothing but its hyper-parameters
    no_optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    return save_checkpoint(run_dir, step, model, no_optimizer, trainer_state, keep_last=1)


# --- reading ------------------------------------------------------------------------------------
def list_checkpoints(run_dir: str) -> list[str]:
    """Complete-looking checkpoint directories of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, n)) for n in os.listdir(root) if (m := _STEP_DIR.match(n))]
    return [p for _, p in sorted(found) if os.path.isfile(os.path.join(p, "trainer.json"))]


@dataclass
class Checkpoint:
    """A verified checkpoint: its path, model config, trainer.json contents, and state tensors."""

    path: str
    config: ModelConfig
    trainer: dict
    state: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return int(self.trainer["step"])


def read_checkpoint(path: str, verify: bool = True) -> Checkpoint:
    """Reads and verifies one checkpoint directory; raises CheckpointError naming the bad file."""
    st = _safetensors()
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory not found: {path}")
    tj = os.path.join(path, "trainer.json")
    try:
        with open(tj) as f:
            trainer = json.load(f)
        manifest = trainer["manifest"]
    except FileNotFoundError:
        raise CheckpointError(f"incomplete checkpoint {path}: {tj} is missing") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"corrupt checkpoint file {tj}: {e}") from None
    if trainer.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{tj}: checkpoint format {trainer.get('format')} is not {FORMAT_VERSION}")
    for name in _TENSOR_FILES:
        fp = os.path.join(path, name)
        if not os.path.isfile(fp):
            raise CheckpointError(f"incomplete checkpoint: {fp} is missing")
        size, want = os.path.getsize(fp), manifest[name]["bytes"]
        if size != want:
            raise CheckpointError(f"corrupt checkpoint file {fp}: {size} bytes, expected {want} (truncated?)")
        if verify and file_sha256(fp) != manifest[name]["sha256"]:
            raise CheckpointError(f"corrupt checkpoint file {fp}: sha256 does not match the manifest")
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = ModelConfig.from_dict(json.load(f))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"bad model config {os.path.join(path, 'config.json')}: {e}") from None
    try:
        state = st.load_file(os.path.join(path, "state.safetensors"))
    except Exception as e:  # safetensors raises its own error type for corrupt headers
        raise CheckpointError(f"corrupt checkpoint file {os.path.join(path, 'state.safetensors')}: {e}") from None
    return Checkpoint(path, config, trainer, state)


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory from a run directory (its newest checkpoint) or a checkpoint directory."""
    if os.path.isfile(os.path.join(path, "trainer.json")):
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"no checkpoint found in {path} (expected {checkpoint_dir(path)}/step_*/ "
                              f"or a checkpoint directory holding trainer.json)")
    return found[-1]


def read_trainer(path: str) -> tuple[str, dict]:
    """(checkpoint directory, its trainer.json) for a run or checkpoint directory; (path, {}) for
    a directory that holds no checkpoint (a weights or RecurrentGemma directory)."""
    try:
        path = resolve_checkpoint(path)
    except CheckpointError:
        return path, {}
    try:
        with open(os.path.join(path, "trainer.json")) as f:
            return path, json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"corrupt checkpoint file {os.path.join(path, 'trainer.json')}: {e}") from None


def check_config(saved: ModelConfig, wanted: ModelConfig, where: str) -> None:
    """Refuses a config mismatch, naming every differing field."""
    diff = saved.diff(wanted)
    if diff:
        fields = "; ".join(f"{k}: checkpoint has {a!r}, requested {b!r}" for k, (a, b) in sorted(diff.items()))
        raise CheckpointError(f"model config does not match checkpoint {where}: {fields}")


def load_weights(ckpt: Checkpoint, model: torch.nn.Module, only: Sequence[str] | None = None) -> None:
    """Loads the verified checkpoint's weights into `model` (whose config must match); `only`:
    the names the file must hold exactly (a checkpoint saved with `only`)."""
    check_config(ckpt.config, model.config, ckpt.path)
    load_weights_file(os.path.join(ckpt.path, "model.safetensors"), model, only)


# safetensors metadata key holding a quantized model's mode (`griffinlm.quantize`)
QUANTIZATION_KEY = "griffinlm_quantization"


def save_weights_file(model: torch.nn.Module, fp: str, only: Sequence[str] | None = None) -> None:
    """Writes `model`'s weights (those named in `only`, if given) to the safetensors file `fp`; a
    quantized model's mode goes in the metadata, so that `load_weights_file` rebuilds its
    structure first."""
    state = model.state_dict()
    if only is not None:
        state = {k: state[k] for k in only}
    weights = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    quantized = getattr(model, "quantization", None)
    _safetensors().save_file(weights, fp, metadata={"format": "pt", **({QUANTIZATION_KEY: quantized}
                                                                       if quantized else {})})


def load_weights_file(fp: str, model: torch.nn.Module, only: Sequence[str] | None = None) -> None:
    """Loads a model.safetensors file into `model` (all of its state, or exactly the names in
    `only`); CheckpointError names the file when it is unreadable or its tensors do not fit."""
    try:
        weights = _safetensors().load_file(fp, device=str(next(model.parameters()).device))
        from safetensors import safe_open

        with safe_open(fp, framework="pt") as f:
            quantized = (f.metadata() or {}).get(QUANTIZATION_KEY)
    except Exception as e:
        raise CheckpointError(f"corrupt checkpoint file {fp}: {e}") from None
    if quantized:  # a quantized model's file: its structure first (`griffinlm.quantize`)
        from .quantize import quantization_of, quantize_

        if quantization_of(model) != quantized:
            try:
                quantize_(model, quantized, empty=True)
            except ValueError as e:
                raise CheckpointError(f"{fp} holds {quantized} weights but the model cannot take them: {e}") from None
        scales = [k[: -len(".data")] for k, v in weights.items() if k.endswith(".data") and v.dtype == torch.int8]
        missing_scales = [k + ".scale" for k in scales if k + ".scale" not in weights]
        if missing_scales:
            raise CheckpointError(f"{fp} holds int8 weights without their scales: {missing_scales[:3]}")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if only is not None:
        missing = sorted(set(only) - set(weights))
    if missing or unexpected:
        raise CheckpointError(f"{fp} does not fit the model: missing {missing}, unexpected {unexpected}")


def load_optimizer(ckpt: Checkpoint, optimizer: torch.optim.Optimizer) -> None:
    optimizer.load_state_dict(_optimizer_from_parts(ckpt.state, ckpt.trainer["optimizer_param_groups"]))


def restore_rng(ckpt: Checkpoint) -> None:
    set_rng_state(ckpt.state, ckpt.trainer["rng"])


def load_model(path: str, device: str | torch.device = "cpu"):
    """(model, checkpoint) from a run or checkpoint directory, weights loaded, in eval mode."""
    from .model import LanguageModel

    ckpt = read_checkpoint(resolve_checkpoint(path))
    model = LanguageModel(ckpt.config).to(device)
    load_weights(ckpt, model)
    return model.eval(), ckpt
