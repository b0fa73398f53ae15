"""The shared loading steps of the generation adapters: family check first, then model and processor."""

import pytest
import torch

pytest.importorskip("transformers")

from mmfusion.backends.hf import ModelNotFoundError  # noqa: E402
from mmfusion.backends.hf_caption import CAPTION_FAMILY  # noqa: E402
from mmfusion.backends.hf_loading import HFFamily, load_family, load_with_processor  # noqa: E402
from mmfusion.backends.hf_speech import SPEECH_FAMILY  # noqa: E402
from tests.backends.test_hf_caption import tiny_blip  # noqa: E402


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return tiny_blip(tmp_path_factory.mktemp("blip") / "model")


def test_load_family_gives_model_processor_device_and_name(blip_dir):
    got = load_family(str(blip_dir), CAPTION_FAMILY, device="cpu")
    assert type(got.model).__name__ == "BlipForConditionalGeneration" and not got.model.training
    assert type(got.processor).__name__ == "BlipProcessor"
    assert got.device == torch.device("cpu") and got.name == f"hf:{blip_dir}"
    assert next(got.model.parameters()).dtype == torch.float32


def test_the_family_is_checked_before_anything_loads(blip_dir):
    with pytest.raises(ValueError, match="transcription needs a whisper model"):
        load_family(str(blip_dir), SPEECH_FAMILY, device="cpu")
    vqa = HFFamily("blip", "BlipForQuestionAnswering", "BlipProcessor", "visual QA", "Salesforce/blip-vqa-base")
    with pytest.raises(ValueError, match="BlipForConditionalGeneration checkpoint; visual QA needs"):
        load_family(str(blip_dir), vqa, device="cpu")


def test_the_processor_loads_from_where_the_model_did(blip_dir, tmp_path):
    import transformers

    seen = []
    got = load_with_processor(
        str(blip_dir), transformers.BlipForConditionalGeneration, lambda src, local: seen.append((src, local)) or 1
    )
    assert got.processor == 1 and seen == [(str(blip_dir), True)]  # a directory: local files only
    with pytest.raises(ModelNotFoundError):
        load_family(str(tmp_path / "nowhere"), CAPTION_FAMILY, device="cpu")
