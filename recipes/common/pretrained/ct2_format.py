"""Reader for CTranslate2's binary model format (``model.bin``).

The layout is the one ``ctranslate2/specs/model_spec.py`` (``ModelSpec._serialize``) writes, in native byte order
(little-endian on every platform CTranslate2 ships wheels for): ``uint32`` binary version, the spec name, ``uint32``
spec revision, ``uint32`` variable count, then per variable its name, ``uint8`` rank, ``uint32`` dims, ``uint8``
dtype id, ``uint32`` byte count and the raw bytes; then ``uint32`` alias count and (alias, target) name pairs.
Strings are a ``uint16`` length (including a trailing NUL) followed by UTF-8 bytes and the NUL.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

SUPPORTED_BINARY_VERSIONS = (6,)

# CTranslate2's DataType enum order (include/ctranslate2/types.h, mirrored by model_spec._dtype_to_type_id).
_CT2_DTYPES = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16)


@dataclass
class CT2Model:
    """The contents of a CTranslate2 ``model.bin``."""

    spec_name: str
    revision: int
    variables: dict[str, torch.Tensor]
    aliases: dict[str, str]


def is_ctranslate2_dir(path: str | Path) -> bool:
    """True when ``path`` is a CTranslate2 model folder (a ``model.bin`` and no transformers ``config.json`` keys)."""
    path = Path(path)
    if not (path / "model.bin").is_file():
        return False
    config = path / "config.json"
    if not config.is_file():
        return True
    try:
        content = json.loads(config.read_text())
    except (OSError, ValueError):
        return True
    return "model_type" not in content and "architectures" not in content


def read_ct2_model(model_bin: str | Path) -> CT2Model:
    """Parse a CTranslate2 ``model.bin`` into named tensors (little-endian, as written on x86/ARM hosts)."""
    data = Path(model_bin).read_bytes()
    reader = _Reader(data, str(model_bin))
    version = reader.unpack("I")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise ValueError(
            f"{model_bin}: CTranslate2 binary version {version} is not supported (supported: "
            f"{SUPPORTED_BINARY_VERSIONS}); re-save the model with a ctranslate2 4.x converter."
        )
    spec_name = reader.string()
    revision = reader.unpack("I")
    variables: dict[str, torch.Tensor] = {}
    for _ in range(reader.unpack("I")):
        name = reader.string()
        shape = tuple(reader.unpack("I") for _ in range(reader.unpack("B")))
        type_id = reader.unpack("B")
        if type_id >= len(_CT2_DTYPES):
            raise ValueError(f"{model_bin}: variable {name!r} has unknown CTranslate2 dtype id {type_id}.")
        dtype = _CT2_DTYPES[type_id]
        num_bytes = reader.unpack("I")
        expected = dtype.itemsize * _numel(shape)
        if num_bytes != expected:
            raise ValueError(
                f"{model_bin}: variable {name!r} {shape} {dtype} holds {num_bytes} bytes, not {expected}."
            )
        raw = bytearray(reader.take(num_bytes))
        tensor = torch.frombuffer(raw, dtype=dtype) if num_bytes else torch.empty(0, dtype=dtype)
        variables[name] = tensor.reshape(shape)
    aliases = {}
    for _ in range(reader.unpack("I")):
        alias = reader.string()
        aliases[alias] = reader.string()
    if reader.offset != len(data):
        raise ValueError(f"{model_bin}: {len(data) - reader.offset} unexpected trailing bytes after the aliases.")
    return CT2Model(spec_name, revision, variables, aliases)


class _Reader:
    def __init__(self, data: bytes, source: str):
        self.data, self.source, self.offset = data, source, 0

    def take(self, size: int) -> bytes:
        if self.offset + size > len(self.data):
            raise ValueError(f"{self.source}: truncated CTranslate2 model (wanted {size} bytes at {self.offset}).")
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def unpack(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.unpack("H"))  # length includes the trailing NUL
        if not raw or raw[-1] != 0:
            raise ValueError(f"{self.source}: malformed string before offset {self.offset}.")
        return raw[:-1].decode("utf-8")


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
