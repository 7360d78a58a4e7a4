from ...registration import register_peft_type
from .config import GNNMoEConfig
from .kronecker import kron_expert_weights, kron_moe_forward
from .layer import GNNMoELayer, Linear
from .model import GNNMoEModel
from .router import GraphRouter, Routing
from .routing_figure import plot_expert_assignments
from .routing_info import get_aux_loss, get_expert_assignments, get_routing_stats

__all__ = [
    "GNNMoEConfig",
    "GNNMoELayer",
    "GNNMoEModel",
    "GraphRouter",
    "Linear",
    "Routing",
    "get_aux_loss",
    "get_expert_assignments",
    "get_routing_stats",
    "kron_expert_weights",
    "kron_moe_forward",
    "plot_expert_assignments",
]

register_peft_type("gnnmoe", config_cls=GNNMoEConfig, model_cls=GNNMoEModel)
