"""DG recipe batches: step-seeded draws that shard into the same global batch, and shard-independent augmentation."""

import pytest
import torch

from recipes.dg import batches


def test_step_batches_shard_into_the_same_global_batch():
    sizes = [7, 11, 5]
    whole = batches.StepBatchSampler(sizes, batch_size=4, steps=3, seed=3)
    drawn = list(whole)
    assert len(drawn) == 3
    assert all(len(b) == 12 for b in drawn)
    # each domain contributes batch_size indices from its own range of the ConcatDataset
    first = torch.tensor(drawn[0])
    assert (first[:4] < 7).all()
    assert ((first[4:8] >= 7) & (first[4:8] < 18)).all()
    assert (first[8:] >= 18).all()
    # 2 processes x 2 accumulation steps: the four shards of a step are the global batch, each example once
    shards = [
        list(batches.StepBatchSampler(sizes, 4, 3, seed=3, accumulation=2, num_processes=2, rank=r)) for r in range(2)
    ]
    for step in range(3):
        got = sorted(i for r in range(2) for m in range(2) for i in shards[r][2 * step + m])
        assert got == sorted(drawn[step])
    # resuming at step 2 replays exactly step 2
    assert list(batches.StepBatchSampler(sizes, 4, 3, seed=3, start_step=2)) == drawn[2:]
    assert list(batches.StepBatchSampler(sizes, 4, 3, seed=4))[0] != drawn[0]
    with pytest.raises(ValueError, match="split evenly"):
        batches.StepBatchSampler(sizes, 4, 3, seed=3, accumulation=5)


def test_augmentation_does_not_depend_on_sharding():
    images = torch.randint(0, 255, (8, 3, 12, 12), dtype=torch.uint8)
    full = batches.augment(images, seed=1, step=5, global_size=8, positions=slice(0, None, 1), hflip=True)
    assert full.shape == (8, 3, 12, 12)
    assert 0 <= full.min()
    assert full.max() <= 1
    assert not torch.allclose(full, images.float() / 255)
    for shard in range(4):
        sel = slice(shard, None, 4)
        part = batches.augment(images[sel], seed=1, step=5, global_size=8, positions=sel, hflip=True)
        torch.testing.assert_close(part, full[sel])
    other = batches.augment(images, seed=1, step=6, global_size=8, positions=slice(0, None, 1), hflip=True)
    assert not torch.allclose(other, full)
