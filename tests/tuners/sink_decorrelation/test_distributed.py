"""DistributedDataParallel in one process (gloo): every adapter gradient reaches the reducer on every step."""

from __future__ import annotations

import torch


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def test_distributed_data_parallel(tmp_path, sink_model, lm_batch):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        plain, wrapped = sink_model(weight=1.0), sink_model(weight=1.0)
        ddp = DistributedDataParallel(wrapped)
        for _ in range(2):  # the reducer must see every adapter gradient on every step
            out = ddp(**lm_batch())
            out.loss.backward()
        plain(**lm_batch()).loss.backward()
        grads = lora_grads(wrapped)
        for name, grad in lora_grads(plain).items():
            torch.testing.assert_close(grads[name], 2 * grad, rtol=1e-4, atol=1e-6)
        assert out.decorrelation_loss.item() > 0
    finally:
        dist.destroy_process_group()
