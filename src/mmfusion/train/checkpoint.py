"""Resumable training checkpoints, written atomically, with no pickles.

``OUT/checkpoints/step-000500/`` is a complete model checkpoint (loadable by ``mmfusion.load``) plus:

- ``optimizer.safetensors``: every optimiser state tensor and the torch RNG state;
- ``train_modules.safetensors``: when the task trains modules beside the model (a distillation loss's
  projection), their weights as ``<name>.<parameter>``; the model files never hold them;
- ``trainer_state.json``: step, schedule length, elapsed time, optimiser param groups and scalars,
  and the run config.

The directory is written under a temporary name and renamed into place when whole; a checkpoint
directory that exists is therefore complete.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..models.checkpoint import write_model_files
from ..utils.io import atomic_replace_dir, atomic_write_json

STATE_FILE, OPTIM_FILE, EXTRA_FILE = "trainer_state.json", "optimizer.safetensors", "train_modules.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def optimizer_state_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimiser state dict into tensors (for safetensors) and JSON-able metadata."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_state_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("state."):
            continue
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, extra in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(extra)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int = 2,
    extra: dict[str, nn.Module] | None = None,
) -> Path:
    """Write ``directory/step-NNNNNN`` and keep only the newest ``keep`` of them; ``extra`` modules (trained beside
    the model, no part of it) go to their own file."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{state['step']:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=directory))
    try:
        write_model_files(model, tmp)
        tensors, meta = optimizer_state_to_tensors(opt)
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        save_file(tensors, str(tmp / OPTIM_FILE))
        if extra:
            weights = {f"{name}.{k}": v.detach().contiguous().cpu() for name, m in extra.items()
                       for k, v in m.state_dict().items()}  # fmt: skip
            save_file(weights, str(tmp / EXTRA_FILE))
        atomic_write_json(tmp / STATE_FILE, {**state, "optimizer": meta})
        atomic_replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not directory.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in directory.iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file() and (p / OPTIM_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def remove_partial(directory: Path) -> int:
    """Delete temporary directories left by a checkpoint write that was killed; returns how many."""
    if not directory.is_dir():
        return 0
    stale = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(".step-")]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return len(stale)


def latest_checkpoint(directory: Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / STATE_FILE).read_text())


def restore_checkpoint(
    ckpt: Path, model: nn.Module, opt: torch.optim.Optimizer, extra: dict[str, nn.Module] | None = None
) -> dict[str, Any]:
    """Load weights (the model's and the ``extra`` modules'), optimiser state and RNG state from a checkpoint;
    returns the trainer state."""
    from safetensors.torch import load_file as load_weights

    state = read_state(ckpt)
    model.load_state_dict(load_weights(str(ckpt / "model.safetensors")), strict=True)
    _restore_extra(ckpt, extra or {})
    tensors = load_file(str(ckpt / OPTIM_FILE))
    opt.load_state_dict(optimizer_state_from_tensors(tensors, state.pop("optimizer")))
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return state


def _restore_extra(ckpt: Path, extra: dict[str, nn.Module]) -> None:
    """The weights of the modules trained beside the model, which must be the ones the checkpoint was saved with."""
    path = ckpt / EXTRA_FILE
    saved = load_file(str(path)) if path.is_file() else {}
    names = sorted({k.split(".", 1)[0] for k in saved})
    if names != sorted(extra):
        raise ValueError(
            f"{ckpt} was saved with training modules {names or 'none'} beside the model, and this run builds "
            f"{sorted(extra) or 'none'}: resume with the settings the run started with (its run.yaml; for "
            "distillation, the same distill.embed_weight and teacher)"
        )
    for name, module in extra.items():
        prefix = name + "."
        module.load_state_dict({k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)}, strict=True)
