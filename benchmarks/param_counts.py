"""Trainable-parameter counts on ViT-B/16 (12 blocks, 768 wide): GNN-MoE configurations next to LoRA and LoKr.

python benchmarks/param_counts.py     # prints a Markdown table, writes benchmarks/results/param_counts.json
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoKrConfig, LoraConfig, get_peft_model
from transformers import ViTConfig, ViTForImageClassification

from peft_gnnmoe import GNNMoEConfig

QKV = ["q_proj", "k_proj", "v_proj"]
CONFIGS = {
    "GNN-MoE default (q,k,v; E=4, top-2, n=4, r=4, GCN width 64)": GNNMoEConfig(),
    "GNN-MoE default + o_proj, fc1, fc2": GNNMoEConfig(target_modules=QKV + ["o_proj", "fc1", "fc2"]),
    "GNN-MoE default, GAT router": GNNMoEConfig(router="gat"),
    "GNN-MoE default, SAGE router": GNNMoEConfig(router="sage"),
    "GNN-MoE benchmark budget (r=1, width 16, no expert bias)": GNNMoEConfig(
        kron_rank=1, router_hidden=16, expert_bias=False
    ),
    "GNN-MoE every other block (MoA-style)": GNNMoEConfig(
        layers_to_transform=list(range(1, 12, 2)), layers_pattern="layers"
    ),
    "LoRA r=8 (q,v)": LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
    "LoRA r=8 (q,k,v)": LoraConfig(r=8, target_modules=QKV),
    "LoKr r=8 (q,k,v)": LoKrConfig(r=8, target_modules=QKV),
}


def main() -> None:
    vit_b16 = ViTConfig(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        image_size=224,
        patch_size=16,
    )
    rows = {}
    for name, config in CONFIGS.items():
        with torch.device("meta"):
            model = get_peft_model(ViTForImageClassification(vit_b16), config)
        rows[name] = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)
    print("| ViT-B/16 adapter (classifier head excluded) | trainable params |\n|---|---:|")
    for name, count in rows.items():
        print(f"| {name} | {count:,} |")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "param_counts.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
