import pytest

from peft_gnnmoe.utils.model_card import ADAPTER_PLACEHOLDER, loading_snippet, update_model_card, usage_section


def test_snippet_starts_with_the_registering_import_and_names_the_base_model():
    snippet = loading_snippet("GNNMOE", "google/vit-base", "ViTForImageClassification", "transformers.models.vit")
    lines = snippet.splitlines()
    assert lines[0].startswith("import peft_gnnmoe")
    assert "from transformers import ViTForImageClassification" in lines
    assert "base = ViTForImageClassification.from_pretrained('google/vit-base')" in lines
    assert f"model = PeftModel.from_pretrained(base, {ADAPTER_PLACEHOLDER!r})" in lines


@pytest.mark.parametrize("parent_library", [None, "my_package.models"])
def test_snippet_falls_back_to_auto_model_for_unknown_classes(parent_library):
    snippet = loading_snippet("GNNMOE", None, "MyModel" if parent_library else None, parent_library)
    assert "from transformers import AutoModel" in snippet
    assert "MyModel" not in snippet


def test_section_goes_after_the_yaml_header_and_is_replaced_on_update(tmp_path):
    (tmp_path / "README.md").write_text("---\nlibrary_name: peft\n---\n\n# Model Card\n")
    update_model_card(tmp_path, usage_section("Loading", "GNNMOE", "import peft_gnnmoe  # first"))
    update_model_card(tmp_path, usage_section("Loading", "GNNMOE", "import peft_gnnmoe  # second"))
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n---\n")
    assert card.count("## Loading") == 1
    assert "# second" in card
    assert "# first" not in card
    assert card.index("## Loading") < card.index("# Model Card")


def test_card_is_created_when_missing(tmp_path):
    path = update_model_card(tmp_path, usage_section("Loading", "GNNMOE", "import peft_gnnmoe"))
    assert "KeyError: 'GNNMOE'" in open(path).read()
