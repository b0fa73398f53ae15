"""Model families built from modules, the registry that names them and their presets, and the checkpoint format."""

from .checkpoint import load, save_model
from .clip import CLIP, CLIPConfig, CLIPOutput
from .registry import FAMILIES, FamilySpec, create_model, describe_models, list_models, model_config

__all__ = [
    "CLIP",
    "CLIPConfig",
    "CLIPOutput",
    "FAMILIES",
    "FamilySpec",
    "create_model",
    "describe_models",
    "list_models",
    "load",
    "model_config",
    "save_model",
]
