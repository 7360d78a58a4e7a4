"""The lip-reading front end of the AVSR recipe, and any transformers image model applied frame by frame.

The default video encoder is :class:`LipEncoderModel` (a 3-D conv stem, a small 2-D ResNet per frame and a temporal
Transformer, the usual lip-reading front end); it saves and loads its weights as a transformers model
(``save_pretrained``/``from_pretrained``, safetensors). Any transformers image model id can stand in for it (applied
frame by frame, pooled).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput


class LipEncoderConfig(PreTrainedConfig):
    """Configuration of :class:`LipEncoderModel`.

    Args:
        stem_channels: channels of the 3-D convolution over (time 5, 7, 7) on the grayscale frames.
        channels: channels of each 2-D ResNet stage (each stage after the first halves the resolution).
        hidden_size: width of the output features.
        num_layers: temporal Transformer layers over the per-frame features (0 for none).
        num_heads: attention heads of those layers.
    """

    model_type = "lip_encoder"

    def __init__(
        self,
        stem_channels: int = 32,
        channels: Sequence[int] = (32, 64),
        hidden_size: int = 256,
        num_layers: int = 2,
        num_heads: int = 4,
        **kwargs,
    ):
        self.stem_channels = stem_channels
        self.channels = list(channels)
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        super().__init__(**kwargs)


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))


def sinusoids(length: int, dim: int) -> torch.Tensor:
    """Sinusoidal position table ``[length, dim]``."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10_000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2], table[:, 1::2] = torch.sin(position * freq), torch.cos(position * freq[: dim // 2])
    return table


class LipEncoderModel(PreTrainedModel):
    """Lip-reading front end: grayscale mouth frames ``[B, T, H, W]`` → features ``[B, T, hidden_size]``.

    The layout of the visual front ends of Stafylakis & Tzimiropoulos (2017) and auto_avsr: Conv3d stem, ResNet
    trunk applied per frame, global pooling, then a temporal Transformer.

    Example:
        >>> encoder = LipEncoderModel(LipEncoderConfig(hidden_size=64, num_layers=1))
        >>> encoder(torch.randn(2, 10, 44, 44)).last_hidden_state.shape
        torch.Size([2, 10, 64])
    """

    config_class = LipEncoderConfig
    base_model_prefix = "lip_encoder"
    main_input_name = "pixel_values"

    def __init__(self, config: LipEncoderConfig):
        super().__init__(config)
        c0 = config.stem_channels
        self.stem = nn.Sequential(
            nn.Conv3d(1, c0, (5, 7, 7), (1, 2, 2), (2, 3, 3), bias=False),
            nn.BatchNorm3d(c0),
            nn.ReLU(),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
        )
        stages, c_in = [], c0
        for i, c_out in enumerate(config.channels):
            stages.append(_BasicBlock(c_in, c_out, stride=1 if i == 0 else 2))
            c_in = c_out
        self.trunk = nn.Sequential(*stages)
        self.proj = nn.Linear(c_in, config.hidden_size)
        layer = nn.TransformerEncoderLayer(
            config.hidden_size,
            config.num_heads,
            4 * config.hidden_size,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        self.temporal = (
            nn.TransformerEncoder(layer, config.num_layers, enable_nested_tensor=False) if config.num_layers else None
        )
        self.norm = nn.LayerNorm(config.hidden_size)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)

    def forward(self, pixel_values: torch.Tensor, lengths: torch.Tensor | None = None) -> BaseModelOutput:
        b, t, h, w = pixel_values.shape
        x = self.stem(pixel_values.unsqueeze(1))  # B, C, T, h', w'
        x = x.transpose(1, 2).reshape(b * t, x.shape[1], x.shape[3], x.shape[4])  # B*T, C, h', w'
        x = self.trunk(x).mean(dim=(2, 3)).view(b, t, -1)  # B, T, C
        x = self.proj(x) + sinusoids(t, self.config.hidden_size).to(x)  # B, T, D
        if self.temporal is not None:
            pad = None if lengths is None else torch.arange(t, device=x.device)[None] >= lengths[:, None].to(x.device)
            x = self.temporal(x, src_key_padding_mask=pad)
        return BaseModelOutput(last_hidden_state=self.norm(x))


class FrameWiseImageEncoder(nn.Module):
    """Any transformers image model applied to each frame (grayscale repeated to its channels), pooled per frame.

    A model with a fixed input size (``config.image_size``, e.g. a ViT pretrained at 224 px, whose position
    embeddings fit that size) gets its frames resized to it (bilinear), so 88 x 88 mouth crops need no flag.
    """

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model
        self.channels = getattr(model.config, "num_channels", 3)
        self.config = model.config

    @property
    def hidden_size(self) -> int:
        c = self.model.config
        return getattr(c, "hidden_size", None) or c.hidden_sizes[-1]

    @property
    def input_size(self) -> tuple[int, int] | None:
        """The ``(height, width)`` the image model was built for, or None when it takes any size."""
        size = getattr(self.model.config, "image_size", None)
        if size is None:
            return None
        return (size, size) if isinstance(size, int) else tuple(size)

    def forward(self, pixel_values: torch.Tensor, lengths: torch.Tensor | None = None) -> BaseModelOutput:
        b, t, h, w = pixel_values.shape
        frames = pixel_values.reshape(b * t, 1, h, w)
        size = self.input_size
        if size is not None and (h, w) != size:
            frames = nn.functional.interpolate(frames, size=size, mode="bilinear", align_corners=False)
        frames = frames.expand(-1, self.channels, -1, -1)
        out = self.model(pixel_values=frames)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = out.last_hidden_state.mean(dim=1)
        return BaseModelOutput(last_hidden_state=pooled.reshape(b, t, -1))


def load_video_encoder(name_or_path: str) -> nn.Module:
    """A saved :class:`LipEncoderModel` directory, or any transformers image model (id or path) used frame by frame."""
    from transformers import AutoModel

    if _is_lip_dir(name_or_path):
        return LipEncoderModel.from_pretrained(name_or_path)
    return FrameWiseImageEncoder(AutoModel.from_pretrained(name_or_path))


def _is_lip_dir(path: str) -> bool:
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    with open(cfg, encoding="utf-8") as f:
        return json.load(f).get("model_type") == LipEncoderConfig.model_type


def video_hidden_size(encoder: nn.Module) -> int:
    """Width of a video encoder's output features."""
    return encoder.hidden_size if isinstance(encoder, FrameWiseImageEncoder) else encoder.config.hidden_size
