"""Gradient checkpointing: the loss and its gradients are the same with and without it (reentrant or not), and
transformers releases that run module hooks inside the checkpoint are refused with a clear error."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from peft_gnnmoe.tuners.sink_decorrelation.calls import checkpoints_call


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_same_loss_and_grads(use_reentrant, sink_model, lm_batch):
    data = lm_batch()
    plain = sink_model(weight=1.0)
    out_plain = plain(**data)
    out_plain.loss.backward()
    ckpt = sink_model(weight=1.0)
    ckpt.get_base_model().activation_checkpointing_enable({"use_reentrant": use_reentrant})
    ckpt.enable_input_require_grads()
    assert all(layer.gradient_checkpointing for layer in ckpt.get_base_model().model.layers)
    out_ckpt = ckpt(**data)
    torch.testing.assert_close(out_ckpt.decorrelation_loss, out_plain.decorrelation_loss)
    out_ckpt.loss.backward()
    grads_plain, grads_ckpt = lora_grads(plain), lora_grads(ckpt)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-4, atol=1e-6)


def _checkpoint_call_like_transformers_5_22(layer: nn.Module) -> None:
    """Give ``layer`` the ``__call__`` of transformers 5.0 to 5.22's GradientCheckpointingLayer: the whole call,
    module hooks included, runs inside the checkpoint."""

    def __call__(self, *args, **kwargs):  # noqa: N807
        if self.gradient_checkpointing and self.training:
            call = functools.partial(nn.Module.__call__, self, **kwargs)
            return self._gradient_checkpointing_func(call, *args)
        return nn.Module.__call__(self, *args, **kwargs)

    layer.__class__ = type(type(layer).__name__, (type(layer),), {"__call__": __call__})


def test_this_transformers_checkpoints_forward_not_call(make_lm):
    layers = make_lm().model.layers
    assert not checkpoints_call(layers[0])
    _checkpoint_call_like_transformers_5_22(layers[0])
    assert checkpoints_call(layers[0])


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointing_that_wraps_call_is_refused(use_reentrant, sink_model, lm_batch):
    model = sink_model(weight=1.0)
    model.get_base_model().activation_checkpointing_enable({"use_reentrant": use_reentrant})
    model.enable_input_require_grads()
    for layer in model.get_base_model().model.layers:
        _checkpoint_call_like_transformers_5_22(layer)
    with pytest.raises(RuntimeError, match=r"checkpoints __call__.*transformers>=5\.23\.0"):
        model(**lm_batch())


def test_checkpointing_that_wraps_call_is_fine_without_the_loss(sink_model, lm_batch):
    model = sink_model(weight=1.0)
    model.get_base_model().activation_checkpointing_enable({"use_reentrant": False})
    for layer in model.get_base_model().model.layers:
        _checkpoint_call_like_transformers_5_22(layer)
    with torch.no_grad():
        assert torch.isfinite(model(**lm_batch()).loss)
    assert torch.isfinite(model.eval()(**lm_batch()).loss)
