import pytest

from mmfusion.config import ConfigError, apply_overrides, format_help
from mmfusion.train import RunConfig


def test_overrides_read_numbers_lists_and_tuples_as_typed():
    cfg = apply_overrides(
        RunConfig(),
        [
            "--train.lr=5e-4",
            "train.batch_size=64",
            "--data.shapes.object_weights=(0.2, 0.4, 0.4)",  # the form --help shows defaults in
            "--train.betas=[0.9, 0.95]",
        ],
    )
    assert cfg.train.lr == 5e-4 and cfg.train.batch_size == 64
    assert cfg.data.shapes.object_weights == (0.2, 0.4, 0.4)
    assert cfg.train.betas == (0.9, 0.95)


def test_bad_overrides_say_what_was_wrong():
    with pytest.raises(ConfigError, match="did you mean train.lr"):
        apply_overrides(RunConfig(), ["--train.lrr=1e-3"])
    with pytest.raises(ConfigError, match="expected a number"):
        apply_overrides(RunConfig(), ["--train.lr=fast"])
    with pytest.raises(ConfigError, match=r"expected a list such as \[1, 2\]"):
        apply_overrides(RunConfig(), ["--train.betas=0.9"])


def test_help_shows_defaults_in_a_form_that_can_be_typed_back():
    text = format_help(RunConfig())
    line = next(ln for ln in text.splitlines() if "--train.betas=" in ln)
    assert "(default [0.9, 0.98])" in line
    default = line.split("(default ")[1].rstrip(")")
    assert apply_overrides(RunConfig(), [f"--train.betas={default}"]).train.betas == (0.9, 0.98)


def test_the_composition_recipe_is_a_clip_training_config_with_hard_negatives():
    from pathlib import Path

    from mmfusion.config import from_dict, load_yaml

    path = Path(__file__).resolve().parents[1] / "recipes" / "clip-composition.yaml"
    cfg = from_dict(RunConfig, load_yaml(path))
    assert cfg.task == "clip" and cfg.preset == "clip-tiny"
    assert cfg.train.hard_negatives == 2 and cfg.train.time == "5m"


def test_the_captioner_rerank_recipe_fine_tunes_a_captioner():
    from pathlib import Path

    from mmfusion.config import from_dict, load_yaml
    from mmfusion.data.negatives import NEGATIVE_TYPES

    path = Path(__file__).resolve().parents[1] / "recipes" / "rerank-captioner.yaml"
    cfg = from_dict(RunConfig, load_yaml(path))
    assert cfg.task == "rerank" and cfg.preset == "caption-tiny" and cfg.family().name == "captioner"
    assert cfg.train.lr == 3e-4 and cfg.train.batch_size == 32
    assert cfg.family().task_adapter("rerank").__name__ == "CaptionRerankTask"
    assert cfg.model_config().decoder.memory_positions  # a captioner loaded whole takes this one override
    assert cfg.rerank.kinds.count("swap_relation") == 4 and set(cfg.rerank.kinds) <= set(NEGATIVE_TYPES)
