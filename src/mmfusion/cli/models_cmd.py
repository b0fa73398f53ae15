"""``mmfusion models``: every model name mmfusion takes, native presets and pretrained backends, from the registry."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from .common import command


def cmd_models(args: argparse.Namespace, extra: list[str]) -> int:
    """Every loadable thing: the presets of mmfusion's own families, then the pretrained backends."""
    from ..models.registry import FAMILIES, describe_models, model_config

    print("presets (mmfusion.create_model(NAME), mmfusion train TASK --preset NAME):")
    for name, family, desc in describe_models():
        print(f"  {name:14s} {family:10s} {desc}")
        if args.verbose:
            print("     ", asdict(model_config(name)[1]))
    print("\npretrained backends (mmfusion.load('hf:<hub-id>' or a save_pretrained directory), from your own cache):")
    for spec in FAMILIES.values():
        if not spec.native:
            types = "/".join(spec.model_types)
            print(f"  {spec.name:14s} {spec.interface:11s} {spec.help} (model_type {types}; e.g. {spec.example})")
    return 0


def add_parser(sub) -> None:
    command(
        sub,
        "models",
        cmd_models,
        help="list model presets and the pretrained backends mmfusion.load takes",
        description="List the presets of mmfusion's own model families (with -v, their configs) and the "
        "pretrained model types mmfusion.load reads from a Hugging Face cache or a save_pretrained directory.",
    )
