"""The hooks' lifetime: none outside a training forward, none after a failed one, none shared between threads, and
no loss on generate()'s decoding steps."""

from __future__ import annotations

import threading

import pytest
import torch


def _layer_hook_counts(model) -> list[int]:
    return [len(layer._forward_hooks) for layer in model.get_base_model().model.layers]


def test_eval_and_generate_have_no_layer_hooks(sink_model, lm_batch):
    model = sink_model(weight=0.1)
    layers = model.get_base_model().model.layers
    seen = []
    handle = layers[0].register_forward_pre_hook(lambda m, a: seen.append(len(m._forward_hooks)))
    model(**lm_batch())  # training: the loss hook (one per chosen layer) exists during the forward...
    assert seen == [1]
    assert all(len(layer._forward_hooks) == 0 for layer in layers)  # ...and is gone afterwards
    model.eval()
    seen.clear()
    out = model(**lm_batch())
    assert not hasattr(out, "decorrelation_loss")
    assert seen == [0]
    model.generate(input_ids=lm_batch()["input_ids"][:1, :3], max_new_tokens=2, do_sample=False)
    assert set(seen) == {0}
    handle.remove()


def test_generate_in_train_mode_computes_no_loss(sink_model, lm_batch):
    model = sink_model(weight=0.1)  # in train mode
    layers = model.get_base_model().model.layers
    seen = []
    handle = layers[0].register_forward_pre_hook(lambda m, a: seen.append(len(m._forward_hooks)))
    prompt = lm_batch()["input_ids"][:1, :3]
    generated = model.generate(input_ids=prompt, max_new_tokens=3, do_sample=False)
    handle.remove()
    assert generated.shape == (1, 6)
    assert seen == [0, 0, 0]  # no decorrelation hook on any of the three steps


def test_a_failed_forward_leaves_no_hooks_behind(sink_model, lm_batch, lm_tokens):
    model = sink_model(weight=0.1)
    data = lm_batch()
    bad = dict(data, input_ids=data["input_ids"].clone())
    bad["input_ids"][0, 1] = lm_tokens["vocab"] + 5  # out of the vocabulary: the embedding raises inside the forward
    with pytest.raises(IndexError):
        model(**bad)
    assert _layer_hook_counts(model) == [0, 0, 0]
    torch.testing.assert_close(model(**data).loss, sink_model(weight=0.1)(**data).loss)


def test_concurrent_forwards_each_get_their_own_loss(sink_model, lm_batch):
    model = sink_model(weight=0.5)
    batches = [lm_batch(seed=s, lengths=(9, 4 + s)) for s in range(4)]
    expected = [model(**b).loss.detach() for b in batches]
    results: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run(worker: int) -> None:
        try:
            barrier.wait()
            for step in range(6):
                index = (worker + 2 * step) % len(batches)
                results[worker, step] = (index, model(**batches[index]).loss.detach())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(results) == 12
    for (worker, step), (index, loss) in results.items():
        torch.testing.assert_close(loss, expected[index], rtol=1e-5, atol=1e-6, msg=f"worker {worker} step {step}")
    assert _layer_hook_counts(model) == [0, 0, 0]
    assert len(model.base_model._calls) == 0


def test_a_training_call_with_labels_and_a_cache_warns(sink_model, lm_batch):
    from transformers import DynamicCache

    model = sink_model(weight=0.1)
    data = lm_batch()
    with pytest.warns(UserWarning, match="treated as a decoding step"):
        out = model(**data, past_key_values=DynamicCache())
    assert not hasattr(out, "decorrelation_loss")
