"""Dynamic int8 of a torch model on CPU: the linear layers' weights stored in int8, activations quantised per
call. One place for it: pretrained models (``--quantize int8``), native ones (``mmfusion.load(run,
quantize="int8")``) and checkpoints that ``mmfusion quantize --runtime torch`` kept all go through here."""

from __future__ import annotations

import warnings

import torch

INT8 = "int8"


def quantize_int8(module: torch.nn.Module, per_channel: bool = False) -> torch.nn.Module:
    """A copy of ``module`` with every ``nn.Linear`` replaced by its dynamic int8 version (x86/ARM CPU): one
    scale per weight matrix, or per output channel. Several times less memory for those layers and faster
    matrix products where they are large."""
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch announces a move of this API to torchao; it works as is
        return quantize_dynamic(module, {torch.nn.Linear: qconfig}, dtype=torch.qint8, inplace=False)


def native_int8(model: torch.nn.Module, fingerprint: str, per_channel: bool = False) -> torch.nn.Module:
    """A native mmfusion model in dynamic int8, on CPU, named and fingerprinted apart from its fp32 weights
    (caches and indexes must not mix the two models' vectors)."""
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("int8 dynamic quantisation runs on CPU; load the model with device='cpu'")
    q = quantize_int8(model, per_channel)
    q.fingerprint = f"{fingerprint}-int8{'-pc' if per_channel else ''}"
    q.precision = "int8-dynamic-torch"
    q.meta = {**(getattr(model, "meta", None) or {}), "quantize": INT8, "per_channel": per_channel}
    return q
