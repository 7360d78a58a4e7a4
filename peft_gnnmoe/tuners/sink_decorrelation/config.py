from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from peft import LoraConfig
from peft.config import PeftConfig

from ...registration import peft_type_member
from ...utils.model_card import add_loading_section

PEFT_TYPE_NAME = "SINK_DECORRELATION"
SINK_DECORRELATION_PEFT_TYPE = peft_type_member(PEFT_TYPE_NAME)


def _jsonable(value: Any) -> Any:
    """Sets become sorted lists (recursively), so a nested config dict survives ``json.dumps``."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, set):
        return sorted(_jsonable(v) for v in value)
    return value


@dataclass
class SinkDecorrelationConfig(PeftConfig):
    """Configuration of [`SinkDecorrelationModel`][peft_gnnmoe.SinkDecorrelationModel]: an inner PEFT method
    trained with a BOS-decorrelation loss.

    The wrapper adds ``weight * L_decor`` to the causal-LM loss, where ``L_decor`` is, per sequence, the mean over the
    chosen decoder layers and its selected tokens of ``cos(h[BOS], h[t])**2``, weighted over the sequences like the
    model's own loss (see ``loss.py``), following "Mitigating Attention Sinks and Massive Activations in Audio-Visual
    Speech Recognition with LLMs" (arXiv 2510.22603). The inner config (LoRA or any other non-prompt PEFT method)
    decides which adapters exist and are trained; it is stored inside this config's ``adapter_config.json`` and
    rebuilt on load.

    Example:
        ```py
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> from peft_gnnmoe import SinkDecorrelationConfig
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        >>> llm = LlamaForCausalLM(LlamaConfig(vocab_size=64, num_key_value_heads=2, bos_token_id=1, **tiny))
        >>> config = SinkDecorrelationConfig(base_config=LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
        >>> model = get_peft_model(llm, config).train()
        >>> ids = torch.tensor([[1, 5, 9, 12, 7]])  # BOS (id 1) first
        >>> out = model(input_ids=ids, labels=ids)  # out.loss = CE + 0.1 * L_decor
        ```

    The reference implementation's loss (all layers but the last, the tokens between BOS and the transcript, pooled
    over the micro-batch) is ``layers="all_but_last", tokens="reference", reduction="tokens"``.
    """

    base_config: PeftConfig | dict | None = field(
        default_factory=LoraConfig,
        metadata={
            "help": "The inner PEFT config whose adapters are trained. Default: `LoraConfig()`, PEFT's default LoRA "
            "(r=8) on the projections PEFT targets for the model type (q_proj and v_proj for Llama, Qwen2, "
            "Mistral...). A dict (as stored in adapter_config.json) is turned back into its config class. None: no "
            "adapters are injected, the model stays frozen and the wrapper only computes the loss (a warning says so "
            "when the model is built for training)."
        },
    )
    weight: float = field(
        default=0.1,
        metadata={
            "help": "lambda: the total loss is CE + weight * decorrelation loss. 0 disables it. The reference code "
            "uses 1e4 with its own reduction; see 'Choosing λ' in the sink-decorrelation guide for the loss scale."
        },
    )
    layers: str | list[int] = field(
        default="all",
        metadata={
            "help": "Decoder layers whose residual-stream output enters the loss: 'all', 'all_but_last' (the "
            "reference code's hidden_states[1:L]) or a list of layer indices (negative counts from the end)."
        },
    )
    form: Literal["squared", "abs"] = field(
        default="squared", metadata={"help": "Penalty on the cosine: 'squared' (cos**2, default) or 'abs' (|cos|)."}
    )
    tokens: Literal["all", "prefix", "reference"] = field(
        default="all",
        metadata={
            "help": "Tokens compared with BOS: 'all' valid tokens; 'prefix' = valid tokens whose label is -100 "
            "(modality tokens, delimiters, prompt; also padding when no attention_mask is passed); 'reference' = "
            "the reference code's positions: those after BOS and before the first label that is not -100. "
            "'prefix' and 'reference' need labels."
        },
    )
    reduction: Literal["sample", "tokens"] = field(
        default="sample",
        metadata={
            "help": "'sample' (default): each sequence's mean over its selected tokens and the chosen layers, "
            "weighted like the model's own loss (exact under gradient accumulation and several processes); "
            "'tokens': the reference code's mean over all selected tokens of the micro-batch, per layer (not "
            "invariant under gradient accumulation or several processes)."
        },
    )
    bos: Literal["token", "first"] = field(
        default="token",
        metadata={
            "help": "How BOS is found in each sequence when forward() gets no bos_positions: 'token' = first "
            "non-padding occurrence of bos_token_id, 'first' = first non-padding position."
        },
    )
    bos_token_id: int | None = field(
        default=None, metadata={"help": "BOS token id; None takes the model config's bos_token_id."}
    )
    layers_module: str | None = field(
        default=None,
        metadata={
            "help": "Dotted path of the decoder layers' nn.ModuleList inside the transformers model (e.g. "
            "'model.layers'); found automatically when None."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = SINK_DECORRELATION_PEFT_TYPE
        if isinstance(self.base_config, dict):
            self.base_config = PeftConfig.from_peft_type(**self.base_config)
        if self.base_config is not None:
            if not isinstance(self.base_config, PeftConfig):
                raise TypeError(f"base_config must be a PeftConfig or a dict, got {type(self.base_config).__name__}.")
            if self.base_config.is_prompt_learning or self.base_config.is_adaption_prompt:
                raise ValueError("base_config must inject adapter layers (e.g. LoRA), not prompt learning.")
            if self.base_config.peft_type == PEFT_TYPE_NAME:
                raise ValueError("base_config cannot itself be a SinkDecorrelationConfig.")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)):
            raise TypeError(f"weight must be a number, got {self.weight!r}.")
        if not math.isfinite(self.weight):
            raise ValueError(f"weight must be a finite number >= 0, got {self.weight}.")
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}.")
        if isinstance(self.layers, str):
            if self.layers not in ("all", "all_but_last"):
                raise ValueError(f"layers must be 'all', 'all_but_last' or a list of ints, got {self.layers!r}.")
        else:
            self.layers = list(self.layers)
            if not self.layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
                raise ValueError(f"layers must be a non-empty list of ints, got {self.layers!r}.")
        if self.form not in ("squared", "abs"):
            raise ValueError(f"form must be 'squared' or 'abs', got {self.form!r}.")
        if self.tokens not in ("all", "prefix", "reference"):
            raise ValueError(f"tokens must be 'all', 'prefix' or 'reference', got {self.tokens!r}.")
        if self.reduction not in ("sample", "tokens"):
            raise ValueError(f"reduction must be 'sample' or 'tokens', got {self.reduction!r}.")
        if self.bos not in ("token", "first"):
            raise ValueError(f"bos must be 'token' or 'first', got {self.bos!r}.")

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Save ``adapter_config.json``; next to saved adapter weights, also add the loading snippet
        (``import peft_gnnmoe`` first, or peft fails with ``KeyError``) to the model card."""
        super().save_pretrained(save_directory, **kwargs)
        add_loading_section(
            self,
            save_directory,
            "Loading this sink-decorrelation adapter",
            auto_mapping=kwargs.get("auto_mapping_dict"),
        )

    def to_dict(self) -> dict:
        """The config as a JSON-ready dict, with the inner config serialised by its own ``to_dict``."""
        output = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "base_config"}
        output["base_config"] = None if self.base_config is None else _jsonable(self.base_config.to_dict())
        return output
