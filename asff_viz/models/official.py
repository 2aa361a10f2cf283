"""The official implementation's checkpoints mapped onto these models: the explicit key-remap tables of the
official `module_list` layouts (Darknet-53 and MobileNetV2 YOLOv3, baseline and ASFF), the config a state_dict
needs, Darknet `.weights` files and torchvision's MobileNetV2 state_dict for the backbones. Kept next to the
models they serve, as timm keeps its `checkpoint_filter_fn`; `asff_viz.checkpoint` reads files and calls these.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, summarize_keys
from .config import ModelConfig
from .head import SLOTS

# Official `module_list` indices of the Darknet-53 backbone.
_BACKBONE = {0: "backbone.stem"}
for _stage in range(1, 6):
    _BACKBONE[2 * _stage - 1] = f"backbone.dark{_stage}.downsample"
    _BACKBONE[2 * _stage] = f"backbone.dark{_stage}.residual"

# Official `module_list` indices after the backbone, per layout. Parameter-free layers (SPP, upsample,
# DropBlock) keep their slots inside our Sequentials so the neck's indices line up with the official order.
_NECK_ASFF = {
    **{11 + i: f"neck.level0.{i}" for i in range(7)},
    18: "neck.lateral1",
    **{20 + i: f"neck.level1.{i}" for i in range(5)},
    25: "neck.lateral2",
    **{27 + i: f"neck.level2.{i}" for i in range(6)},
}
_NECK_BASELINE = {
    **{11 + i: f"neck.level0.{i}" for i in range(7)},
    18: "fusion.levels.0.expand",
    19: "head.levels.0",
    20: "neck.lateral1",
    **{22 + i: f"neck.level1.{i}" for i in range(5)},
    27: "fusion.levels.1.expand",
    28: "head.levels.1",
    29: "neck.lateral2",
    **{31 + i: f"neck.level2.{i}" for i in range(6)},
    37: "head.levels.2",
}
_FUSION_PARTS = {
    0: {"stride_level_1": "resize.1", "stride_level_2": "resize.2.1"},
    1: {"compress_level_0": "resize.0.0", "stride_level_2": "resize.2"},
    2: {"compress_level_0": "resize.0.0"},
}
_FUSION_COMMON = {"expand": "expand", "weight_levels": "weight_logits",
                  **{f"weight_level_{k}": f"weight_convs.{k}" for k in range(3)}}
_HEAD_PARTS = {
    "guide_wh": "guide_wh",
    "Feature_adaption.conv_offset": "adaption.conv_offset",
    "Feature_adaption.dconv": "adaption.dconv",
    "Feature_adaption.rfb": "adaption.rfb",
    "conv": "predict",
}


# The MobileNetV2 models (`models/yolov3_mobilev2.py`). Backbone: torchvision's layout under `module_list.N`
# (and `features.N` in torchvision's own ImageNet checkpoint): N = 0 the stem, 1..17 the inverted residual
# blocks, 18 the last 1x1 conv. A `ConvBNReLU` numbers its conv 0 and BN 1; an inverted residual numbers its
# parts in `conv`, and the first block (expansion 1) has no expansion conv, so its numbers start one lower.
_MOBILE_BACKBONE = {0: "backbone.stem", **{n: f"backbone.blocks.{n - 1}" for n in range(1, 18)}, 18: "backbone.last"}
_MOBILE_EXPANSION_ONE = {1}  # module_list / features indices of the blocks without an expansion conv
_CONV_BN_RELU_PARTS = {"0": "conv", "1": "bn"}
_INVERTED_RESIDUAL_PARTS = {"conv.0.0": "expand.conv", "conv.0.1": "expand.bn", "conv.1.0": "depthwise.conv",
                            "conv.1.1": "depthwise.bn", "conv.2": "project", "conv.3": "project_bn"}
_INVERTED_RESIDUAL_ONE_PARTS = {"conv.0.0": "depthwise.conv", "conv.0.1": "depthwise.bn", "conv.1": "project",
                                "conv.2": "project_bn"}
# Neck, `module_list[19..39]`; 21 (SPP), 24, 30, 37 (DropBlock), 27 and 34 (upsample + route) hold no weights.
_NECK_MOBILE = {
    19: "neck.level0.0", 20: "neck.level0.1", 22: "neck.level0.3", 23: "neck.level0.4", 25: "neck.level0.6",
    26: "neck.lateral1",
    28: "neck.level1.0", 29: "neck.level1.1", 31: "neck.level1.3", 32: "neck.level1.4",
    33: "neck.lateral2",
    35: "neck.level2.0", 36: "neck.level2.1", 38: "neck.level2.3", 39: "neck.level2.4",
}
# `ASFFmobile` (`level_{l}_conv.*`): level 2 compresses source 1 too (`compress_level_1`).
_MOBILE_FUSION_PARTS = {**_FUSION_PARTS, 2: {**_FUSION_PARTS[2], "compress_level_1": "resize.1.0"}}
LAYOUTS = ("asff", "baseline", "mobile_asff", "mobile_baseline")


def _map_parts(rest: str, table: dict[str, str]) -> str | None:
    for official, ours in sorted(table.items(), key=lambda item: -len(item[0])):
        if rest == official or rest.startswith(official + "."):
            return ours + rest[len(official):]
    return None


def _map_unit_suffix(rest: str) -> str:
    """Inside a module: `module_list.<b>.<0|1>` (resblock) and `batch_norm` (add_conv) to our names."""
    rest = re.sub(r"(^|\.)module_list\.(\d+)\.0\.", r"\1blocks.\2.reduce.", rest)
    rest = re.sub(r"(^|\.)module_list\.(\d+)\.1\.", r"\1blocks.\2.expand.", rest)
    return rest.replace("batch_norm.", "bn.")


def mobilenet_backbone_key(index: int, rest: str) -> str | None:
    """Our name for the key `rest` of MobileNetV2 module `index` (official `module_list.N` and torchvision
    `features.N` alike); None if it has no counterpart."""
    target = _MOBILE_BACKBONE.get(index)
    if target is None:
        return None
    if index in (0, 18):
        mapped = _map_parts(rest, _CONV_BN_RELU_PARTS)
    else:
        mapped = _map_parts(rest, _INVERTED_RESIDUAL_ONE_PARTS if index in _MOBILE_EXPANSION_ONE
                            else _INVERTED_RESIDUAL_PARTS)
    return None if mapped is None else f"{target}.{mapped}"


def official_key_to_project(key: str, layout: str) -> str | None:
    """Our parameter name for an official state_dict key (a layout of `LAYOUTS`); None if unknown."""
    mobile = layout.startswith("mobile_")
    match = re.match(r"module_list\.(\d+)\.(.+)$", key)
    if match:
        index, rest = int(match.group(1)), match.group(2)
        if mobile:
            if index in _MOBILE_BACKBONE:
                return mobilenet_backbone_key(index, rest)
            target = _NECK_MOBILE.get(index)
            return None if target is None else f"{target}.{_map_unit_suffix(rest)}"
        table = {**_BACKBONE, **(_NECK_BASELINE if layout == "baseline" else _NECK_ASFF)}
        if index not in table:
            return None
        target = table[index]
        if target.startswith("head."):
            mapped = _map_parts(rest, _HEAD_PARTS)
            return None if mapped is None else f"{target}.{mapped}"
        return f"{target}.{_map_unit_suffix(rest)}"
    match = re.match(r"level_(\d)_(fusion|header|conv)\.(.+)$", key)
    if match:
        level, kind, rest = int(match.group(1)), match.group(2), match.group(3)
        if kind == "header":
            mapped = _map_parts(rest, _HEAD_PARTS)
            return None if mapped is None else f"head.levels.{level}.{mapped}"
        if kind != ("conv" if mobile else "fusion"):
            return None
        if layout == "mobile_baseline":  # one 3x3 add_conv per level, no fusion
            return f"fusion.levels.{level}.expand.{_map_unit_suffix(rest)}"
        parts = (_MOBILE_FUSION_PARTS if mobile else _FUSION_PARTS).get(level, {})
        mapped = _map_parts(rest, {**_FUSION_COMMON, **parts})
        return None if mapped is None else f"fusion.levels.{level}.{_map_unit_suffix(mapped)}"
    return None


def is_official_state_dict(state_dict: dict) -> bool:
    return any(key.startswith("module_list.") for key in state_dict)


def official_layout(state_dict: dict) -> str:
    """Which official network a state_dict is, from its keys: one of `LAYOUTS`."""
    if "module_list.1.conv.0.0.weight" in state_dict:  # an inverted residual: MobileNetV2
        if "level_0_conv.weight_levels.weight" in state_dict:
            return "mobile_asff"
        if "level_0_conv.conv.weight" in state_dict:
            return "mobile_baseline"
        raise CheckpointError("state_dict has a MobileNetV2 backbone (`module_list.1.conv.*`) but neither the "
                              "ASFF (`level_0_conv.weight_levels.*`) nor the baseline (`level_0_conv.conv.*`) "
                              "levels: not a checkpoint of the official YOLOv3 MobileNetV2 models.")
    if any(key.startswith("level_0_fusion.") for key in state_dict):
        return "asff"
    if "module_list.37.conv.weight" in state_dict:
        return "baseline"
    raise CheckpointError("state_dict has `module_list.*` keys but neither the ASFF (`level_0_fusion.*`) nor the "
                          "baseline (`module_list.37.*`) head of the Darknet-53 models, nor a MobileNetV2 "
                          "backbone: not a YOLOv3 checkpoint of the official code.")


def official_config(state_dict: dict) -> ModelConfig:
    """The model config an official state_dict needs: family, variant, class count and width from its keys and
    shapes."""
    layout = official_layout(state_dict)
    mobile = layout.startswith("mobile_")
    fusion = "asff" if layout.endswith("asff") else "baseline"
    head_key = ("level_0_header.conv.weight" if layout != "baseline" else "module_list.37.conv.weight")
    if head_key not in state_dict:
        raise CheckpointError(f"official state_dict lacks `{head_key}` (the level-0 prediction conv)")
    outputs = state_dict[head_key].shape[0]
    if outputs % SLOTS or outputs // SLOTS <= 5:
        raise CheckpointError(f"`{head_key}` has {outputs} outputs, not {SLOTS} * (5 + classes)")
    rfb = any(".rfb." in key for key in state_dict)
    stem = state_dict.get("module_list.0.0.weight" if mobile else "module_list.0.conv.weight")
    width = 1.0 if stem is None or stem.shape[0] == 32 else stem.shape[0] / 32
    return ModelConfig(num_classes=outputs // SLOTS - 5, fusion=fusion, rfb=rfb, width=width,
                       backbone="mobilenet_v2" if mobile else "darknet53")


def remap_official_state_dict(state_dict: dict) -> tuple[ModelConfig, dict]:
    """Official key layout to ours. Returns the config it needs and the remapped state_dict.

    Raises CheckpointError listing the keys with no counterpart.
    """
    layout = official_layout(state_dict)
    config = official_config(state_dict)
    remapped, unknown = {}, []
    for key, value in state_dict.items():
        target = official_key_to_project(key, layout)
        if target is None:
            unknown.append(key)
        else:
            remapped[target] = value
    if unknown:
        raise CheckpointError(f"{len(unknown)} official keys have no place in the {config.variant} model: "
                              f"{summarize_keys(unknown)}")
    return config, remapped



def load_darknet_weights(backbone: nn.Module, path: str | os.PathLike) -> int:
    """Load a Darknet `.weights` file (e.g. `darknet53.conv.74`) into the Darknet-53 backbone.

    The file is a header (major, minor, revision as int32, then `seen` as int64 from version 0.2 on) followed
    by float32 values; per conv with BN: beta, gamma, running mean, running var, then the conv weight. Only the
    52 backbone convs are read; later layers (a classifier) are ignored. Returns the number of convs loaded.
    """
    path = Path(path)
    if not hasattr(backbone, "conv_layers"):
        raise CheckpointError(f"{path}: Darknet .weights initialise a Darknet-53 backbone; this model's backbone is "
                              f"{type(backbone).__name__} (for MobileNetV2 pass torchvision's ImageNet state_dict, "
                              "e.g. mobilenet_v2-b0353104.pth).")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such Darknet weights file.")
    raw = path.read_bytes()
    if len(raw) < 16:
        raise CheckpointError(f"{path}: {len(raw)} bytes, too short for a Darknet weights header.")
    major, minor, _revision = np.frombuffer(raw[:12], dtype=np.int32)
    header = 20 if (major * 10 + minor) >= 2 and major < 1000 and minor < 1000 else 16
    values = np.frombuffer(raw[header: header + (len(raw) - header) // 4 * 4], dtype=np.float32)
    layers = backbone.conv_layers()
    needed = sum(unit.conv.weight.numel() + 4 * unit.bn.num_features for unit in layers)
    if values.size < needed:
        raise CheckpointError(f"{path}: holds {values.size} values, the Darknet-53 backbone needs {needed} "
                              "(truncated file, or weights of another network/width?).")
    offset = 0
    with torch.no_grad():
        for unit in layers:
            for tensor in (unit.bn.bias, unit.bn.weight, unit.bn.running_mean, unit.bn.running_var,
                           unit.conv.weight):
                count = tensor.numel()
                tensor.copy_(torch.from_numpy(values[offset: offset + count].copy()).view_as(tensor))
                offset += count
    return len(layers)


def is_torchvision_mobilenet_v2(state_dict: dict) -> bool:
    """Whether `state_dict` is torchvision's MobileNetV2 (`features.N.*`, e.g. `mobilenet_v2-b0353104.pth`)."""
    return "features.1.conv.0.0.weight" in state_dict and "features.18.0.weight" in state_dict


def remap_torchvision_mobilenet_v2(state_dict: dict) -> dict:
    """torchvision's MobileNetV2 state_dict onto our `MobileNetV2` backbone (keys without `backbone.`), as the
    official recipe initialises the light models; the ImageNet classifier is left out. CheckpointError for
    keys with no counterpart."""
    remapped, unknown = {}, []
    for key, value in state_dict.items():
        if key.startswith("classifier."):
            continue
        match = re.match(r"features\.(\d+)\.(.+)$", key)
        target = mobilenet_backbone_key(int(match.group(1)), match.group(2)) if match else None
        if target is None:
            unknown.append(key)
        else:
            remapped[target.removeprefix("backbone.")] = value
    if unknown:
        raise CheckpointError(f"{len(unknown)} keys of the MobileNetV2 state_dict have no place in the backbone: "
                              f"{summarize_keys(unknown)}")
    return remapped
