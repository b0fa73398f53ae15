import pytest

from mmfusion.data.prompts import PHOTO_TEMPLATES, SHAPES_TEMPLATES, read_templates


def test_every_template_has_a_slot_for_the_label():
    for t in PHOTO_TEMPLATES + SHAPES_TEMPLATES:
        assert "{}" in t


def test_read_templates_from_none_text_list_and_file(tmp_path):
    assert read_templates(None) == PHOTO_TEMPLATES
    assert read_templates("a {}| the {} ") == ("a {}", "the {}")
    assert read_templates(["a {}", "  "]) == ("a {}",)
    f = tmp_path / "prompts.txt"
    f.write_text("a photo of a {}\n\nart of a {}\n", encoding="utf-8")
    assert read_templates(str(f)) == ("a photo of a {}", "art of a {}")


@pytest.mark.parametrize("spec", ["a photo", [], ["{}", "no slot"]])
def test_read_templates_rejects_templates_without_a_slot(spec):
    with pytest.raises(ValueError, match="need a"):
        read_templates(spec)
