"""Model families built from modules, and the registry that names their presets."""

from .clip import CLIP, CLIPConfig, CLIPOutput
from .registry import create_model, describe_models, list_models, load, model_config, save_model

__all__ = [
    "CLIP",
    "CLIPConfig",
    "CLIPOutput",
    "create_model",
    "describe_models",
    "list_models",
    "load",
    "model_config",
    "save_model",
]
