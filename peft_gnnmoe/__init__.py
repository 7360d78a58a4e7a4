"""peft-gnnmoe: GNN-MoE and sink decorrelation as Hugging Face PEFT tuner types.

Importing this package registers the tuner types with peft, so ``get_peft_model``, ``PeftConfig.from_pretrained``,
``PeftModel.from_pretrained`` and the ``AutoPeftModel*`` classes know them.
"""

# --- GNN-MoE ---
from .tuners.gnnmoe import (  # noqa: F401
    GNNMoEConfig,
    GNNMoEModel,
    get_aux_loss,
    get_expert_assignments,
    get_routing_stats,
    plot_expert_assignments,
)

# --- sink decorrelation ---
from .tuners.sink_decorrelation import SinkDecorrelationConfig, SinkDecorrelationModel  # noqa: F401

__version__ = "0.2.0"
