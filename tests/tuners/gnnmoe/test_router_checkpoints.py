"""Adapters saved before the dense router (torch_geometric's sparse layers: SAGEConv's ``lin_l`` / ``lin_r``,
GATConv's (1, H, C) attention vectors) still load, and give the same outputs."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_gnnmoe import GNNMoEConfig

# dense parameter name -> the name the sparse router saved it under
_OLD_NAMES = {"lin_rel.weight": "lin_l.weight", "lin_root.bias": "lin_l.bias", "lin_root.weight": "lin_r.weight"}


def _to_old_layout(state):
    old = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".convs.")
        index, _, name = leaf.partition(".")
        if prefix and name in _OLD_NAMES:
            key = f"{prefix}.convs.{index}.{_OLD_NAMES[name]}"
        elif prefix and name in ("att_src", "att_dst"):
            value = value.squeeze(0)  # GATConv: (1, heads, channels)
        old[key] = value.contiguous()
    return old


@pytest.mark.parametrize("router", ["gcn", "gat", "sage"])
def test_adapter_saved_with_the_sparse_router_layout_loads(router, make_vit, images, tmp_path):
    model = get_peft_model(make_vit(), GNNMoEConfig(router=router, router_layers=2, init_weights=False)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "gnnmoe_router" in name:  # non-zero biases: every router parameter matters
                param.add_(0.2 * torch.randn_like(param))
        want = model(pixel_values=images).logits
    model.save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_model.safetensors"
    new = load_file(str(path))
    old = _to_old_layout(new)
    if router != "gcn":  # the file now really has the old layout (GCNConv and DenseGCNConv agree)
        assert {k: v.shape for k, v in old.items()} != {k: v.shape for k, v in new.items()}
    save_file(old, str(path))
    loaded = PeftModel.from_pretrained(make_vit(), str(tmp_path)).eval()
    with torch.no_grad():
        got = loaded(pixel_values=images).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
