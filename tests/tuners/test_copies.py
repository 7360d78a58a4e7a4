"""Copies of a PEFT model with either tuner: ``copy.deepcopy`` (EMA weights, reference models) and whole-model saves
(``torch.save(model)`` / pickle). The copy computes the same loss as the original, trains on its own, and leaves the
original's parameters, hooks and read-outs alone.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from peft import get_peft_model

from peft_gnnmoe import GNNMoEConfig, get_routing_stats


def _copies(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return {
        "deepcopy": copy.deepcopy(model),
        "torch.save": torch.load(buffer, weights_only=False),  # a whole-model save is a pickle by definition
        "pickle": pickle.loads(pickle.dumps(model)),
    }


@pytest.fixture(params=["sink_decorrelation", "gnnmoe"])
def tuned(request, sink_model, lm_batch, make_vit, images, labels):
    """``(model in train mode, batch, read-out of the model's own loss parts)`` for each tuner."""
    if request.param == "sink_decorrelation":
        return sink_model(weight=1.0), lm_batch(), lambda m: dict(m.base_model.last_loss_parts)
    model = get_peft_model(make_vit(), GNNMoEConfig(modules_to_save=["classifier"])).train()
    with torch.no_grad():  # non-zero experts, so the adapter changes the outputs
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    return model, {"pixel_values": images, "labels": labels}, get_routing_stats


def _loss(model, batch) -> torch.Tensor:
    torch.manual_seed(0)  # GNN-MoE's router noise in training
    return model(**batch).loss


@pytest.mark.parametrize("kind", ["deepcopy", "torch.save", "pickle"])
def test_a_copy_computes_the_same_loss(tuned, kind):
    model, batch, _ = tuned
    expected = _loss(model, batch)
    torch.testing.assert_close(_loss(_copies(model)[kind], batch), expected)


@pytest.mark.parametrize("kind", ["deepcopy", "torch.save", "pickle"])
def test_a_copy_trains_without_touching_the_original(tuned, kind):
    model, batch, read_outs = tuned
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss_before = _loss(model, batch).detach()
    parts_before = read_outs(model)
    clone = _copies(model)[kind]
    optimizer = torch.optim.SGD([p for p in clone.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        _loss(clone, batch).backward()
        optimizer.step()
    assert not torch.allclose(_loss(clone, batch), loss_before)  # the copy learned
    assert all(p.grad is None for p in model.parameters())  # no gradient reached the original
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, before[name], rtol=0, atol=0, msg=name)
    assert repr(read_outs(model)) == repr(parts_before)  # the copy's calls wrote their own read-outs
    torch.testing.assert_close(_loss(model, batch), loss_before)


def test_the_original_keeps_its_hooks_when_the_copy_is_unloaded(sink_model, lm_batch):
    """The copy's hook handles point at the copy's hook dictionaries (a shared handle would remove the original's)."""
    model, batch = sink_model(weight=1.0), lm_batch()
    clone = copy.deepcopy(model)
    clone.base_model.unload()
    assert _loss(model, batch) is not None
    assert model.base_model.last_loss_parts["decorrelation_loss"] > 0
