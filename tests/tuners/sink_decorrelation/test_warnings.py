"""A training batch whose selection is empty in every sequence warns instead of training silently without the term."""

from __future__ import annotations

import warnings

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast


def _tokenizer(lm_tokens) -> PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(lm_tokens["vocab"])}
    vocab.update({"<pad>": lm_tokens["pad"], "<s>": lm_tokens["bos"], "</s>": lm_tokens["eos"]})
    del vocab["w0"], vocab["w1"], vocab["w2"]
    backend = Tokenizer(WordLevel(vocab, unk_token="w3"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_prefix_tokens_with_the_language_modeling_collator_warn(sink_model, lm_tokens):
    collator = DataCollatorForLanguageModeling(_tokenizer(lm_tokens), mlm=False)
    batch = collator([{"input_ids": [1, 5, 6, 7, 8]}, {"input_ids": [1, 9, 10]}])
    assert (batch["labels"] == -100).tolist() == (batch["attention_mask"] == 0).tolist()  # -100 on padding only
    model = sink_model(weight=1e4, tokens="prefix")
    with pytest.warns(UserWarning, match="selects no token in any sequence"):
        out = model(**batch)
    assert out.decorrelation_loss.item() == 0


def test_the_empty_selection_warning_comes_once_per_model(sink_model, lm_batch):
    model = sink_model(weight=1.0, tokens="prefix")
    data = lm_batch()  # labels on every valid token: 'prefix' selects nothing
    with pytest.warns(UserWarning, match="selects no token"):
        model(**data)
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        model(**data)
    assert not [w for w in later if "selects no token" in str(w.message)]


def test_a_selection_in_some_sequence_does_not_warn(sink_model, lm_batch):
    model = sink_model(weight=1.0, tokens="prefix")
    data = lm_batch()
    data["labels"][0, :3] = -100
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model(**data)
    assert not [w for w in record if "selects no token" in str(w.message)]
    assert torch.isfinite(model.last_loss_parts["decorrelation_loss"])
