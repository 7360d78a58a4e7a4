"""The "how to load this adapter" section of the model card (``README.md``) that ``save_pretrained`` writes.

peft has no plugin hook: ``PeftModel.from_pretrained`` on an adapter of a third-party type fails with a bare
``KeyError: 'GNNMOE'`` unless the package that registers the type was imported first. The remedy must therefore be
findable where users look: the card of every saved or pushed adapter. ``PeftModel.save_pretrained`` writes the card
(``create_or_update_model_card``) before the weights and then calls ``config.save_pretrained(folder)`` for every
adapter, so a tuner's config class adds its section there (see ``GNNMoEConfig.save_pretrained``); ``push_to_hub``
uploads the same card (``peft_gnnmoe.utils.hub`` keeps transformers from replacing it by its template).
"""

from __future__ import annotations

import os
import re

ADAPTER_PLACEHOLDER = "path/to/this/adapter"  # the folder, or the Hub repo id once pushed
_START, _END = "<!-- peft-gnnmoe:usage -->", "<!-- /peft-gnnmoe:usage -->"


def loading_snippet(
    peft_type: str,
    base_model: str | None,
    base_model_class: str | None = None,
    parent_library: str | None = None,
    package: str = "peft_gnnmoe",
) -> str:
    """A complete Python snippet that loads the adapter, starting with the import that registers ``peft_type``.

    Args:
        peft_type: the ``PeftType`` value stored in ``adapter_config.json``, e.g. ``"GNNMOE"``.
        base_model: the base model's name or path (``base_model_name_or_path``), or None when unknown.
        base_model_class: class of the base model (``auto_mapping["base_model_class"]``); defaults to ``AutoModel``.
        parent_library: module of that class; only ``transformers`` classes are imported by name.
        package: the package whose import registers ``peft_type``.
    """
    if not base_model_class or not (parent_library or "transformers").startswith("transformers"):
        base_model_class = "AutoModel"
    base = base_model if base_model else "path/to/the/base/model"
    return "\n".join(
        [
            f"import {package}  # registers {peft_type} with peft; without it: KeyError: '{peft_type}'",
            "from peft import PeftModel",
            f"from transformers import {base_model_class}",
            "",
            f"base = {base_model_class}.from_pretrained({base!r})",
            f"model = PeftModel.from_pretrained(base, {ADAPTER_PLACEHOLDER!r})",
        ]
    )


def usage_section(title: str, peft_type: str, snippet: str, package: str = "peft_gnnmoe") -> str:
    """The Markdown section (between markers, so that saving again replaces it) with ``snippet``."""
    return "\n".join(
        [
            _START,
            f"## {title}",
            "",
            f"This is a `{peft_type}` adapter from [peft-gnnmoe](https://pypi.org/project/peft-gnnmoe/): "
            f"`pip install peft-gnnmoe` and `import {package}` before loading it, or peft fails with "
            f"`KeyError: '{peft_type}'`. Replace `{ADAPTER_PLACEHOLDER}` with this folder or its Hub repo id.",
            "",
            "```python",
            snippet,
            "```",
            _END,
        ]
    )


def section_pattern() -> re.Pattern:
    """The loading section of a card, from its start marker to its end marker."""
    return re.compile(re.escape(_START) + r".*?" + re.escape(_END), flags=re.DOTALL)


def update_model_card(folder: str | os.PathLike, section: str) -> str:
    """Put ``section`` into ``folder``/README.md: replace a section written before, else insert it after the YAML
    header (creating the card when there is none). Returns the card's path."""
    path = os.path.join(folder, "README.md")
    text = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    pattern = section_pattern()
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        header = re.match(r"---\n.*?\n---\n", text, flags=re.DOTALL)
        cut = header.end() if header else 0
        text = text[:cut] + "\n" + section + "\n\n" + text[cut:].lstrip("\n")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


def add_loading_section(
    config, save_directory: str | os.PathLike, title: str, auto_mapping: dict | None = None
) -> None:
    """Called from a tuner config's ``save_pretrained``: when adapter weights sit next to the config (a
    ``PeftModel.save_pretrained`` / ``push_to_hub``, not a config-only save), put the loading snippet for
    ``config.peft_type`` into the folder's model card."""
    if not os.path.exists(os.path.join(save_directory, "adapter_model.safetensors")):
        return
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    mapping = auto_mapping or config.auto_mapping or {}
    snippet = loading_snippet(
        peft_type,
        config.base_model_name_or_path,
        base_model_class=mapping.get("base_model_class"),
        parent_library=mapping.get("parent_library"),
    )
    update_model_card(save_directory, usage_section(title, peft_type, snippet))
