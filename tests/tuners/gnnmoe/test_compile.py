"""``torch.compile`` (CPU inductor) on a GNN-MoE ViT: one graph, no breaks, the eager outputs and auxiliary loss, and
in training mode the eager loss and every adapter gradient."""

import shutil

import pytest
import torch
from peft import get_peft_model

from peft_gnnmoe import GNNMoEConfig, get_aux_loss
from peft_gnnmoe.tuners.gnnmoe.kronecker import kron_path


def _inductor_missing() -> str | None:
    try:
        import torch._inductor  # noqa: F401
    except Exception as error:  # a torch build without inductor
        return f"torch inductor cannot be imported ({error})"
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        return "CPU inductor needs a C compiler (gcc / cc) on PATH"
    return None


requires_inductor = pytest.mark.skipif(_inductor_missing() is not None, reason=str(_inductor_missing()))


@pytest.mark.parametrize("router", ["gat", "linear"])
def test_the_router_traces_without_graph_breaks(router, make_vit, images):
    model = get_peft_model(make_vit(num_hidden_layers=1), GNNMoEConfig(router=router, init_weights=False)).eval()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(pixel_values=images)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]


@pytest.mark.slow
@requires_inductor
def test_compiled_model_gives_the_eager_outputs_and_aux_loss(make_vit, images, labels):
    config = GNNMoEConfig(router="gcn", graph="knn+grid", init_weights=False, router_noise_std=0.0)
    model = get_peft_model(make_vit(num_hidden_layers=1), config).eval()
    with torch.no_grad():
        want = model(pixel_values=images, labels=labels)
        want_aux = get_aux_loss(model)
        torch._dynamo.reset()
        got = torch.compile(model)(pixel_values=images, labels=labels)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(get_aux_loss(model), want_aux, rtol=0, atol=1e-6)


@pytest.mark.slow
@requires_inductor
def test_compiled_training_step_gives_the_eager_loss_and_gradients(make_vit, images, labels):
    """Training mode, one block, one compile (~30 s on one core): the dense expert order (its own backward pass)."""
    assert kron_path(32, 32, 4, 4, 4) == "dense"  # the order the tiny ViT takes is the one compiled
    config = GNNMoEConfig(router="gcn", init_weights=False, router_noise_std=0.0)  # noise: eager and inductor RNGs
    model = get_peft_model(make_vit(num_hidden_layers=1), config).train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    want = model(pixel_values=images, labels=labels).loss  # eager first: also sets config.problem_type
    want_grads = torch.autograd.grad(want, list(params.values()))
    torch._dynamo.reset()
    got = torch.compile(model)(pixel_values=images, labels=labels).loss
    got_grads = torch.autograd.grad(got, list(params.values()))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for name, g, w in zip(params, got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
