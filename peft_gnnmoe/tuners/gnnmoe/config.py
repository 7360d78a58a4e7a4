"""Configuration of GNN-MoE adapters."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from ...registration import peft_type_member
from ...utils.model_card import add_loading_section
from .architectures import DEFAULT_SHARED_ROUTER_GROUPS

GNNMOE_PEFT_TYPE = peft_type_member("GNNMOE")

ROUTER_TYPES = ("gcn", "gat", "sage")  # the graph routers (what the DG recipe runs by default)
TOKEN_ROUTER_TYPES = ("linear",)  # per-token routers without message passing (the MoA / GMoE ablation)
GRAPH_MODES = ("knn", "grid", "knn+grid", "grid8", "knn+grid8", "radius", "full")
PREFIX_MODES = ("connect", "isolated")
BALANCE_LOSSES = ("squared_mean", "switch")
EXPERT_DISPATCH = ("auto", "sparse", "dense")

_FLOAT_FIELDS = (
    "router_dropout",
    "router_noise_std",
    "router_temperature",
    "balance_loss_weight",
    "z_loss_weight",
    "expert_dropout",
    "graph_radius",
)
_BOOL_FIELDS = ("add_aux_loss_to_output", "expert_bias", "init_weights", "inference_mode", "recompute_intermediates")


@dataclass
class GNNMoEConfig(PeftConfig):
    """Configuration of [`GNNMoEModel`][peft_gnnmoe.GNNMoEModel]: a mixture of Kronecker adapter experts per
    targeted Linear, routed per token by a graph neural network over the image's patch tokens.

    Paper: "GNN-MoE: Context-Aware Patch Routing using GNNs for Parameter-Efficient Domain Generalization"
    (arXiv 2511.04008). Every adapted Linear computes ``y = x W0 + b0 + sum_e g_e(x) (x H_e + b_e)``, where
    ``H_e = sum_k S_k ⊗ (L_{e,k} R_{e,k})`` (PHM Kronecker expert) and ``g(x)`` is the top-k routing of a GCN, GAT or
    GraphSAGE router over a kNN + spatial-grid graph of the tokens.

    Example:
        ```py
        >>> import peft_gnnmoe
        >>> from peft import get_peft_model
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> vit = ViTForImageClassification(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        ...                                           intermediate_size=128, image_size=32, patch_size=8))
        >>> model = get_peft_model(vit, peft_gnnmoe.GNNMoEConfig(router="gat", modules_to_save=["classifier"]))
        ```
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Names (or a regex) of the Linear layers to adapt. None picks the q/k/v projections of every "
            "encoder block for ViT-family models (ViT, DeiT, BEiT, DINOv2, CLIP/SigLIP vision towers); add "
            "'o_proj', 'fc1', 'fc2' to adapt the output projection and the MLP too."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names (or a regex) of modules not to adapt."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None,
        metadata={"help": "Indices of the blocks to adapt, e.g. [1, 3, 5, 7, 9, 11] for every other block as in MoA."},
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the block list (e.g. 'layers') when `layers_to_transform` is set."}
    )
    num_experts: int = field(default=4, metadata={"help": "Number of Kronecker adapter experts per adapted layer."})
    top_k: int = field(
        default=2,
        metadata={"help": "Experts used per token; their weights are renormalised. top_k == num_experts is dense."},
    )
    expert_dispatch: Literal["auto", "sparse", "dense"] = field(
        default="auto",
        metadata={
            "help": "How tokens meet their experts: 'sparse' runs each expert on the tokens routed to it (cost grows "
            "with top_k), 'dense' runs every expert on every token and zeroes the unchosen ones (cost grows with "
            "num_experts; fewer, larger kernels), 'auto' picks per layer from its shape, top_k and num_experts. "
            "The results are equal; only speed and memory differ."
        },
    )
    recompute_intermediates: bool = field(
        default=True,
        metadata={
            "help": "Recompute the routers' and the experts' intermediate tensors in the backward pass instead of "
            "keeping them from the forward pass: peak training memory near LoRA's for a few percent more step time "
            "(the benchmarks page). False keeps them: faster, more memory. The results are equal."
        },
    )
    kron_factor: int = field(
        default=4,
        metadata={
            "help": "n, the size of the Kronecker rule matrices: the expert weight is a sum of n terms "
            "S_k (n x n) ⊗ L_k R_k (in/n x out/n). Must divide in_features and out_features of every adapted layer."
        },
    )
    kron_rank: int = field(default=4, metadata={"help": "Rank r of the low-rank factor L_k R_k of each expert."})
    router: Literal["gcn", "gat", "sage", "linear"] = field(
        default="gcn",
        metadata={
            "help": "Router: a GNN over the token graph, 'gcn' (GCNConv), 'gat' (GATConv) or 'sage' (SAGEConv), run "
            "as torch_geometric's dense layers; or 'linear', the per-token router of MoA / GMoE (the same depth and "
            "width with nn.Linear layers, no message passing, so `graph` is not used)."
        },
    )
    router_hidden: int = field(default=64, metadata={"help": "Width of the router's GNN layers."})
    router_layers: int = field(default=1, metadata={"help": "Number of GNN layers in the router (1-2 is typical)."})
    router_heads: int = field(
        default=4, metadata={"help": "Attention heads of the GAT router; must divide `router_hidden`."}
    )
    router_dropout: float = field(default=0.0, metadata={"help": "Dropout between the router's GNN layers."})
    router_noise_std: float = field(
        default=0.1, metadata={"help": "Std of Gaussian noise added to router logits in training mode only."}
    )
    router_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the router."})
    graph: Literal["knn", "grid", "knn+grid", "grid8", "knn+grid8", "radius", "full"] = field(
        default="knn+grid",
        metadata={
            "help": "Token graph: 'knn' links each patch to its k most cosine-similar patches (layer input "
            "features), 'grid' to its 4 spatial neighbours on the patch grid, 'grid8' to its 8 neighbours (diagonals "
            "too), 'radius' to every patch whose grid coordinates lie within Euclidean distance `graph_radius`, "
            "'full' to every other patch; 'knn+grid' and 'knn+grid8' unite kNN and grid. The grid modes ('grid', "
            "'grid8', 'radius' and their unions) raise an error when the tokens fit no patch grid (text, ViT-MAE's "
            "shuffled patches): use 'knn' or 'full'. Padding (the model call's attention_mask) is never part of the "
            "graph."
        },
    )
    knn_k: int = field(default=8, metadata={"help": "Neighbours per patch of the kNN graph."})
    graph_radius: float = field(
        default=2.0,
        metadata={
            "help": "r of graph='radius': patches j, k are linked when ||c_j - c_k|| <= r for their (row, col) grid "
            "coordinates c (1: the 4 neighbours, 1.5: the 8 neighbours, 2: adds the patches two steps away in a "
            "line). Finite and > 0; used by 'radius' only."
        },
    )
    prefix_tokens: Literal["connect", "isolated"] = field(
        default="connect",
        metadata={
            "help": "How CLS / distillation / register tokens join the graph: 'connect' links them to every patch "
            "(and to each other), 'isolated' routes them from their own features only."
        },
    )
    num_prefix_tokens: int | None = field(
        default=None,
        metadata={"help": "Special tokens before the patches; None reads it from the model config (CLS=1, ...)."},
    )
    patch_grid: list[int] | None = field(
        default=None,
        metadata={
            "help": "[rows, cols] of the patch grid, fixed for every input; None (default) takes it from each "
            "forward's pixel_values (height / patch_size x width / patch_size), so non-square images, "
            "interpolate_pos_encoding=True and another size at evaluation just work; without pixel_values, from the "
            "model config (image_size / patch_size), else from a square token count."
        },
    )
    shared_router_groups: list[list[str]] | None = field(
        default_factory=lambda: [list(g) for g in DEFAULT_SHARED_ROUTER_GROUPS],
        metadata={
            "help": "Groups of sibling layer names that see the same input and share one router (one routing "
            "decision per token), e.g. [['q_proj', 'k_proj', 'v_proj']]. [] gives every layer its own router."
        },
    )
    balance_loss: Literal["squared_mean", "switch"] = field(
        default="squared_mean",
        metadata={
            "help": "Load-balancing loss of every image (over its real tokens t): 'squared_mean' = "
            "E * sum_e mean_t(p_te)^2, 'switch' = E * sum_e f_e p_e; weighted per sample like the model's loss."
        },
    )
    balance_loss_weight: float = field(default=0.01, metadata={"help": "Weight of the load-balancing loss."})
    z_loss_weight: float = field(default=1e-3, metadata={"help": "Weight of the router z-loss (logsumexp^2)."})
    add_aux_loss_to_output: bool = field(
        default=True,
        metadata={"help": "Add the routers' auxiliary loss to `outputs.loss` whenever the model returns a loss."},
    )
    expert_bias: bool = field(
        default=True, metadata={"help": "Give every expert its own trainable bias b_e (E x out_features numbers)."}
    )
    expert_dropout: float = field(default=0.0, metadata={"help": "Dropout on the experts' input."})
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: the experts' right factors start at zero, so the adapted model equals the base."},
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules besides the adapters to train and save, e.g. ['classifier']."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = GNNMOE_PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self._validate()

    def _validate(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GNNMoEConfig.{name} must be a positive integer, got {value!r}.")

        def choice(name: str, allowed: tuple[str, ...]) -> None:
            if getattr(self, name) not in allowed:
                raise ValueError(f"GNNMoEConfig.{name}={getattr(self, name)!r} is unknown; use one of {allowed}.")

        def real(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"GNNMoEConfig.{name} must be a finite number, got {value!r}.")

        def flag(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"GNNMoEConfig.{name} must be True or False, got {value!r}.")

        def fraction(name: str) -> None:
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"GNNMoEConfig.{name} must be in [0, 1), got {value!r}.")

        def non_negative(name: str) -> None:
            if getattr(self, name) < 0:
                raise ValueError(f"GNNMoEConfig.{name} must be >= 0, got {getattr(self, name)!r}.")

        for name in (
            "num_experts",
            "top_k",
            "kron_factor",
            "kron_rank",
            "router_hidden",
            "router_layers",
            "router_heads",
            "knn_k",
        ):
            positive(name)
        if self.top_k > self.num_experts:
            raise ValueError(
                f"GNNMoEConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}: a token cannot use more "
                "experts than exist. Lower top_k or raise num_experts."
            )
        choice("router", ROUTER_TYPES + TOKEN_ROUTER_TYPES)
        choice("graph", GRAPH_MODES)
        choice("prefix_tokens", PREFIX_MODES)
        choice("balance_loss", BALANCE_LOSSES)
        choice("expert_dispatch", EXPERT_DISPATCH)
        if self.router == "gat" and self.router_hidden % self.router_heads != 0:
            raise ValueError(
                f"GNNMoEConfig.router_hidden={self.router_hidden} is not divisible by router_heads="
                f"{self.router_heads}: the GAT router concatenates its heads. Pick a divisor as router_heads."
            )
        for name in _FLOAT_FIELDS:
            real(name)
        for name in _BOOL_FIELDS:
            flag(name)
        fraction("router_dropout")
        fraction("expert_dropout")
        for name in ("router_noise_std", "balance_loss_weight", "z_loss_weight"):
            non_negative(name)
        if not self.graph_radius > 0:
            raise ValueError(
                f"GNNMoEConfig.graph_radius must be > 0 (a distance in patches; 1.0 links the 4 grid neighbours), "
                f"got {self.graph_radius!r}."
            )
        if not self.router_temperature > 0:
            raise ValueError(f"GNNMoEConfig.router_temperature must be > 0, got {self.router_temperature!r}.")
        if self.num_prefix_tokens is not None and (
            not isinstance(self.num_prefix_tokens, int) or self.num_prefix_tokens < 0
        ):
            raise ValueError(f"GNNMoEConfig.num_prefix_tokens must be None or >= 0, got {self.num_prefix_tokens!r}.")
        if self.patch_grid is not None:
            grid = list(self.patch_grid)
            if len(grid) != 2 or any(not isinstance(v, int) or v < 1 for v in grid):
                raise ValueError(f"GNNMoEConfig.patch_grid must be [rows, cols] of positive ints, got {grid!r}.")
            self.patch_grid = grid
        if self.shared_router_groups is None:
            self.shared_router_groups = []
        if any(isinstance(g, str) or len(g) < 1 for g in self.shared_router_groups):
            raise ValueError(
                "GNNMoEConfig.shared_router_groups must be a list of lists of layer names, e.g. "
                f"[['q_proj', 'k_proj', 'v_proj']]; got {self.shared_router_groups!r}."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("GNNMoEConfig.layers_pattern only works together with layers_to_transform.")

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Save ``adapter_config.json``; next to saved adapter weights, also refuse pickled weights and add the
        loading snippet (``import peft_gnnmoe`` first) to the model card.

        ``PeftModel.save_pretrained`` writes the card and the weights of an adapter before calling this, so this is
        where a pickled ``adapter_model.bin`` (``safe_serialization=False``) is caught: it is deleted again and the
        save fails, since peft-gnnmoe loads safetensors only.
        """
        bin_path = os.path.join(save_directory, "adapter_model.bin")
        safe_path = os.path.join(save_directory, "adapter_model.safetensors")
        if os.path.exists(bin_path) and (
            not os.path.exists(safe_path) or os.path.getmtime(bin_path) >= os.path.getmtime(safe_path)
        ):
            os.remove(bin_path)
            raise ValueError(
                "GNN-MoE adapters are saved as safetensors only: save_pretrained(safe_serialization=False) wrote a "
                "pickled adapter_model.bin (removed again), which peft-gnnmoe refuses to load because unpickling "
                "can run arbitrary code. Save with safe_serialization=True (the default)."
            )
        super().save_pretrained(save_directory, **kwargs)
        add_loading_section(
            self, save_directory, "Loading this GNN-MoE adapter", auto_mapping=kwargs.get("auto_mapping_dict")
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """Load the config; refuses adapter folders that hold only pickled (``.bin``) weights."""
        folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
        if os.path.isdir(folder):
            names = set(os.listdir(folder))
            pickled_only = "adapter_model.bin" in names and "adapter_model.safetensors" not in names
        else:
            pickled_only = _hub_repo_has_only_pickled_weights(pretrained_model_name_or_path, subfolder, kwargs)
        if pickled_only:
            raise ValueError(
                f"{folder} holds pickled weights (adapter_model.bin) and no adapter_model.safetensors. "
                "peft-gnnmoe only reads safetensors: re-save the adapter with save_pretrained("
                "safe_serialization=True)."
            )
        return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)


def _hub_repo_has_only_pickled_weights(repo_id: str, subfolder: str | None, kwargs: dict) -> bool:
    """True when a Hub repo has adapter_model.bin but no adapter_model.safetensors; False when unsure (offline)."""
    try:
        from huggingface_hub import file_exists

        def exists(name: str) -> bool:
            path = f"{subfolder}/{name}" if subfolder else name
            return file_exists(repo_id, path, revision=kwargs.get("revision"), token=kwargs.get("token"))

        return not exists("adapter_model.safetensors") and exists("adapter_model.bin")
    except Exception:  # offline, private repo, or not a repo id: let peft's own loading report it
        return False
