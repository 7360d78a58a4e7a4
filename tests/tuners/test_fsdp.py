"""FSDP2 for both tuners: torch's ``fully_shard`` on every encoder / decoder layer and then on the model, 2 CPU
processes with gloo. A few training steps give the losses of DDP on the same data, extra loss terms included; the
full state dict gathered from the shards, saved with ``save_pretrained`` and reloaded in one process, gives the
sharded model's outputs.

accelerate's FSDP plugin needs GPUs (``ACCELERATE_USE_CPU=1 accelerate launch --use_fsdp`` runs DDP instead, without
a word), so this drives torch's API directly. One launch (``torch.multiprocessing``, file rendezvous, no port) runs
both tuners; the tests read what rank 0 wrote. The workers build their own tiny models (as the DDP workers beside the
tuners' tests do), the same ones the reloading process builds.
"""

from __future__ import annotations

import copy
import gc
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import transformers as T
from peft import LoraConfig, PeftModel, get_peft_model

from peft_gnnmoe import GNNMoEConfig, SinkDecorrelationConfig
from peft_gnnmoe.utils.model_introspection import find_decoder_layers

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
    ),
]

WORLD_SIZE = 2
STEPS = 3
LAUNCH_TIMEOUT = 600  # seconds; the launch takes ~20 s on 2 cores


# ---- the models and data, the same on every rank and in the reloading process ----------------------------------


def _vit() -> torch.nn.Module:
    torch.manual_seed(0)
    config = T.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8,
        num_labels=3,
    )  # fmt: skip
    return T.ViTForImageClassification(config)


def _gnnmoe() -> PeftModel:
    # random experts and large aux weights, so that the routers' loss shows in the total; no noise in the forward
    config = GNNMoEConfig(
        init_weights=False, router_noise_std=0.0, balance_loss_weight=5.0, z_loss_weight=1.0,
        modules_to_save=["classifier"],
    )  # fmt: skip
    return get_peft_model(_vit(), config).train()


def _gnnmoe_sparse() -> PeftModel:
    # each expert on its own tokens; 64 experts, top-1, 34 tokens a rank: most experts get no token and must still
    # get a (zero) gradient, or DDP would wait for it
    config = GNNMoEConfig(
        init_weights=False, router_noise_std=0.0, balance_loss_weight=5.0, z_loss_weight=1.0,
        modules_to_save=["classifier"], num_experts=64, top_k=1, expert_dispatch="sparse",
    )  # fmt: skip
    return get_peft_model(_vit(), config).train()


def _images() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {
        "pixel_values": torch.randn(4, 3, 32, 32, generator=generator),
        "labels": torch.randint(0, 3, (4,), generator=generator),
    }


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = T.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return T.LlamaForCausalLM(config)


def _sink() -> PeftModel:
    config = SinkDecorrelationConfig(base_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), weight=1.0)
    model = get_peft_model(_llama(), config)
    generator = torch.Generator().manual_seed(100)
    with torch.no_grad():  # random lora_B, so that LoRA is not a no-op
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.train()


def _tokens() -> dict[str, torch.Tensor]:
    """4 BOS-first sequences, right-padded (two of them) to 8 tokens."""
    generator = torch.Generator().manual_seed(5)
    ids = torch.cat([torch.ones(4, 1, dtype=torch.long), torch.randint(3, 64, (4, 7), generator=generator)], dim=1)
    mask = (torch.arange(8) < torch.tensor([[8], [5], [8], [3]])).long()
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _aux_loss(model: PeftModel, output) -> torch.Tensor:
    return model.base_model.aux_loss()


def _decorrelation_loss(model: PeftModel, output) -> torch.Tensor:
    return output.decorrelation_loss


# name: (adapted model, base model, batch, the tuner's extra loss term of the last forward)
TUNERS = {
    "gnnmoe": (_gnnmoe, _vit, _images, _aux_loss),
    "gnnmoe_sparse": (_gnnmoe_sparse, _vit, _images, _aux_loss),
    "sink_decorrelation": (_sink, _llama, _tokens, _decorrelation_loss),
}


# ---- the workers -------------------------------------------------------------------------------------------------


def _train(model: torch.nn.Module, peft_model: PeftModel, batch: dict, extra_term) -> torch.Tensor:
    """``STEPS`` AdamW steps on ``batch``; returns ``(STEPS, 2)``: the loss and the extra term of every step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    steps = []
    for _ in range(STEPS):
        output = model(**batch)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        steps.append((output.loss.item(), extra_term(peft_model, output).item()))
    return torch.tensor(steps, dtype=torch.float64)


def _gather(value):
    values = [None] * WORLD_SIZE
    dist.all_gather_object(values, value)
    return values


def _run_tuner(name: str, rank: int, out: Path) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    build, _, make_batch, extra_term = TUNERS[name]
    sharded = build()
    reference = copy.deepcopy(sharded)  # the same weights, trained under DDP
    ddp = DistributedDataParallel(reference)
    for layer in find_decoder_layers(sharded)[1]:  # ViTLayer / LlamaDecoderLayer: one FSDP unit each
        fully_shard(layer)  # on the default mesh: all ranks, on the CPU
    fully_shard(sharded)  # the rest (embeddings, head, modules_to_save) in the root unit
    trainable = [p for p in sharded.parameters() if p.requires_grad]

    batch = {key: value.chunk(WORLD_SIZE)[rank] for key, value in make_batch().items()}  # this rank's half
    fsdp_steps = _train(sharded, sharded, batch, extra_term)
    ddp_steps = _train(ddp, reference, batch, extra_term)

    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    sharded.eval()
    with torch.no_grad():
        logits = sharded(**{k: v for k, v in batch.items() if k != "labels"}).logits
    result = {
        "fsdp": torch.stack(_gather(fsdp_steps)),  # (ranks, steps, [loss, extra term])
        "ddp": torch.stack(_gather(ddp_steps)),
        "logits": torch.cat(_gather(logits)),  # the full batch, in order
        "trainable": len(trainable),
        "dtensors": sum(isinstance(p, DTensor) for p in trainable),
    }
    if rank == 0:
        sharded.save_pretrained(out / name, state_dict=full)
    return result


def _worker(rank: int, out: Path) -> None:
    torch.set_num_threads(1)  # 2 processes on 2 cores
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out / 'rendezvous'}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=LAUNCH_TIMEOUT),
    )
    results = {name: _run_tuner(name, rank, out) for name in TUNERS}
    if rank == 0:
        torch.save(results, out / "results.pt")
    # explicit teardown: left to interpreter exit, gloo's threads can abort a rank (no finally: after an error the
    # other rank would wait here forever, while spawn's join ends it)
    gc.collect()  # the sharded models hold the group: release them first, or its destructor can hang later
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> tuple[Path, dict]:
    """One 2-process launch for every test here: the folder rank 0 saved the adapters in, and its results."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("fsdp")
    context = mp.start_processes(_worker, args=(out,), nprocs=WORLD_SIZE, join=False, start_method="spawn")
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not context.join(timeout=5):  # raises with the worker's traceback when one fails
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail(f"the 2-process FSDP2 run did not finish in {LAUNCH_TIMEOUT} s")
    return out, torch.load(out / "results.pt", weights_only=False)


# ---- the tests ---------------------------------------------------------------------------------------------------

tuners = pytest.mark.parametrize("tuner", sorted(TUNERS))


@tuners
def test_trainable_parameters_are_sharded(fsdp_run, tuner):
    result = fsdp_run[1][tuner]
    assert result["dtensors"] == result["trainable"] > 0


@tuners
def test_losses_are_those_of_ddp(fsdp_run, tuner):
    result = fsdp_run[1][tuner]
    torch.testing.assert_close(result["fsdp"][..., 0], result["ddp"][..., 0], rtol=1e-5, atol=1e-6)


@tuners
def test_extra_loss_terms_are_those_of_ddp(fsdp_run, tuner):
    """GNN-MoE's router loss / the decorrelation term: part of the loss above, and the same as under DDP."""
    result = fsdp_run[1][tuner]
    torch.testing.assert_close(result["fsdp"][..., 1], result["ddp"][..., 1], rtol=1e-5, atol=1e-6)


@tuners
def test_extra_loss_terms_are_not_zero(fsdp_run, tuner):
    assert bool((fsdp_run[1][tuner]["fsdp"][..., 1] > 0).all())


@tuners
def test_saved_full_state_dict_reloads_to_the_sharded_outputs(fsdp_run, tuner):
    out, results = fsdp_run
    _, base, make_batch, _ = TUNERS[tuner]
    model = PeftModel.from_pretrained(base(), out / tuner).eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in make_batch().items() if k != "labels"}).logits
    torch.testing.assert_close(logits, results[tuner]["logits"], rtol=1e-5, atol=1e-5)


def test_the_sparse_run_has_experts_without_tokens():
    """What the ``gnnmoe_sparse`` run checks: experts that get no token of a rank's batch and still no unused
    parameters for DDP (its training would stop with an error otherwise)."""
    model = _gnnmoe_sparse()
    model(**{key: value.chunk(WORLD_SIZE)[0] for key, value in _images().items()})
    loads = [r.load for router in model.base_model.active_routers().values() for r in router.routings]
    assert loads and all(bool((load == 0).any()) for load in loads)
