"""``PeftModel.push_to_hub`` keeps the model card that ``save_pretrained`` writes for this package's adapter types.

transformers' ``PushToHubMixin.push_to_hub``, which ``PeftModel`` inherits, saves the adapter into a temporary folder
and then overwrites its ``README.md`` with the card of the repository, or, for a new repository, with a generic
transformers template (``library_name: transformers``, no base model, no loading snippet). A user who loads the pushed
adapter without ``import peft_gnnmoe`` then meets a bare ``KeyError: 'GNNMOE'`` and a card that does not say why.

For a model with a GNN-MoE or sink-decorrelation adapter, the push therefore writes: for a new repository the card
``save_pretrained`` wrote (PEFT's, with our loading section); for a repository that has a card, that card with our
loading section put in (or replaced); in both cases with the repository card's tags and ``push_to_hub(tags=...)``
added. Every other model pushes exactly as before.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import EntryNotFoundError

from .model_card import section_pattern, update_model_card

CARD_FACTORY = "create_and_tag_model_card"  # the name push_to_hub looks up in its module
_patch_lock = threading.Lock()


class _CardKeeper:
    """Stands in for the card ``push_to_hub`` writes over the saved one: ``save(path)`` keeps what is at ``path``."""

    def __init__(self, hub_card: ModelCard | None, tags: list[str] | None) -> None:
        self.hub_card, self.tags = hub_card, list(tags or [])

    def save(self, path: str | os.PathLike) -> None:
        saved = open(path, encoding="utf-8").read() if os.path.isfile(path) else ""
        if self.hub_card is None and not saved:  # save_pretrained wrote no card (PEFT always does)
            ModelCard.from_template(ModelCardData(library_name="peft")).save(path)
        if self.hub_card is not None:  # the repository's card, with this adapter's loading section
            self.hub_card.save(path)
            section = section_pattern().search(saved)
            if section:
                update_model_card(os.path.dirname(os.path.abspath(path)), section.group(0))
        card = ModelCard.load(path)
        tags = list(card.data.tags or [])
        for tag in [*(self.hub_card.data.tags or [] if self.hub_card else []), *self.tags]:
            if tag not in tags:
                tags.append(tag)
        card.data.tags = tags or None
        card.save(path)


def _load_or_keep(repo_id: str, tags: list[str] | None = None, token: str | bool | None = None, **_: Any):
    try:
        hub_card = ModelCard.load(repo_id, token=token)
    except EntryNotFoundError:  # a new repository (or one without a card)
        hub_card = None
    return _CardKeeper(hub_card, tags)


_card_keeping_types: set[str] = set()  # the PeftType values whose adapters keep their card on push


def _keeps_card(model: Any) -> bool:
    configs = getattr(model, "peft_config", {}) or {}
    return any(str(getattr(c.peft_type, "value", c.peft_type)) in _card_keeping_types for c in configs.values())


def install_push_to_hub(peft_model_cls: type, peft_type: str) -> None:
    """Make ``peft_model_cls.push_to_hub`` keep the card of models with a ``peft_type`` adapter; idempotent."""
    _card_keeping_types.add(peft_type)
    original = peft_model_cls.push_to_hub
    if getattr(original, "_peft_gnnmoe_keeps_card", False):
        return
    module_globals = original.__globals__

    @functools.wraps(original)
    def push_to_hub(self, *args: Any, **kwargs: Any):
        if not _keeps_card(self):
            return original(self, *args, **kwargs)
        if CARD_FACTORY not in module_globals:
            warnings.warn(
                f"this transformers release's push_to_hub has no {CARD_FACTORY}, so peft-gnnmoe cannot keep the model "
                "card with the adapter's loading snippet: the pushed card may lack it. Check the card on the Hub, "
                "or save_pretrained and upload the folder with huggingface_hub.upload_folder.",
                stacklevel=2,
            )
            return original(self, *args, **kwargs)
        with _patch_lock:  # the factory is a module global of transformers: one push at a time swaps it
            factory = module_globals[CARD_FACTORY]
            module_globals[CARD_FACTORY] = _load_or_keep
            try:
                return original(self, *args, **kwargs)
            finally:
                module_globals[CARD_FACTORY] = factory

    push_to_hub._peft_gnnmoe_keeps_card = True
    peft_model_cls.push_to_hub = push_to_hub
