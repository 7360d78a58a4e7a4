"""Every tensor the DG recipe feeds the model goes to the model's device first (training and evaluation).

No GPU here: the model is moved to the meta device while the Accelerator and the loaders stay on the CPU, as a model
on a GPU with loaders on the host would be. A batch left on the host fails with a device mismatch; moved, the
meta forward runs (and only reading a number out of a meta tensor fails)."""

import pytest
import torch
from torch.utils.data import DataLoader, Subset
from transformers import PreTrainedModel

from recipes.dg import config, evaluation, methods, sweep, train
from recipes.dg.batches import collate
from recipes.dg.data import TensorDomain

CLASSES = [str(d) for d in range(10)]
MISMATCH = ("is not on the expected device", "Expected all tensors to be on the same device")


@pytest.fixture
def meta_model():
    model = methods.build_model("lora", train.EMBEDDED_BACKBONE, CLASSES, methods.MethodArgs())
    for module in model.modules():
        # transformers >= 5.25 kernelizes a loaded model (hub kernels) and again at every train()/eval(); the kernels
        # library refuses the meta device, which only stands in for a GPU here. Turn kernels off while on the CPU.
        if isinstance(module, PreTrainedModel) and getattr(module, "use_kernels", False):
            module.use_kernels = False
    return model.to("meta")


@pytest.fixture
def loader():
    g = torch.Generator().manual_seed(0)
    domain = TensorDomain(torch.randint(0, 256, (6, 3, 28, 28), dtype=torch.uint8, generator=g), torch.arange(6))
    return DataLoader(Subset(domain, list(range(6))), batch_size=3, collate_fn=collate)


def test_evaluation_moves_batches_to_the_model_device(meta_model, loader):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    with pytest.raises((RuntimeError, NotImplementedError)) as err:
        evaluation.evaluate(acc, meta_model, acc.prepare(loader), [0.5] * 3, [0.5] * 3, "eval")
    message = str(err.value)
    for text in MISMATCH:
        assert text not in message
    assert "meta" in message  # it got as far as reading the meta predictions


@pytest.mark.parametrize("augment", [True, False])
def test_training_loss_is_computed_on_the_model_device(meta_model, loader, augment):
    recipe = sweep.Sweep.__new__(sweep.Sweep)  # only the attributes training_loss reads
    recipe.cfg = config.DGRunConfig(
        config.DataConfig(no_augment=not augment),
        config.ModelConfig(),
        config.TrainingConfig(batch_size=3),
        config.ExecutionConfig(output_dir="unused", checkpointing_steps=1),
    )
    recipe.domains, recipe.info = [None, None], None
    recipe.mean, recipe.std = [0.5] * 3, [0.5] * 3
    images, labels = next(iter(loader))
    assert images.device.type == "cpu"
    loss = recipe.training_loss(meta_model.train(), images, labels, trial=0, step=0, positions=slice(0, 3))
    assert loss.device.type == "meta"
    assert loss.shape == ()
