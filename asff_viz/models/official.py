"""The official implementation's checkpoints mapped onto these models: the explicit key-remap tables of the
official `module_list` layout (Darknet-53 YOLOv3, baseline and ASFF heads), the config a state_dict needs, and
Darknet `.weights` files for the backbone. Kept next to the models they serve, as timm keeps its
`checkpoint_filter_fn`; `asff_viz.checkpoint` reads files and calls these.
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


def official_key_to_project(key: str, layout: str) -> str | None:
    """Our parameter name for an official state_dict key (layout 'asff' or 'baseline'); None if unknown."""
    match = re.match(r"module_list\.(\d+)\.(.+)$", key)
    if match:
        index, rest = int(match.group(1)), match.group(2)
        table = {**_BACKBONE, **(_NECK_BASELINE if layout == "baseline" else _NECK_ASFF)}
        if index not in table:
            return None
        target = table[index]
        if target.startswith("head."):
            mapped = _map_parts(rest, _HEAD_PARTS)
            return None if mapped is None else f"{target}.{mapped}"
        return f"{target}.{_map_unit_suffix(rest)}"
    match = re.match(r"level_(\d)_(fusion|header)\.(.+)$", key)
    if match:
        level, kind, rest = int(match.group(1)), match.group(2), match.group(3)
        if kind == "header":
            mapped = _map_parts(rest, _HEAD_PARTS)
            return None if mapped is None else f"head.levels.{level}.{mapped}"
        mapped = _map_parts(rest, {**_FUSION_COMMON, **_FUSION_PARTS.get(level, {})})
        return None if mapped is None else f"fusion.levels.{level}.{_map_unit_suffix(mapped)}"
    return None


def is_official_state_dict(state_dict: dict) -> bool:
    return any(key.startswith("module_list.") for key in state_dict)


def official_config(state_dict: dict) -> ModelConfig:
    """The model config an official state_dict needs: variant, class count and width from its keys and shapes."""
    if any(key.startswith("level_0_fusion.") for key in state_dict):
        fusion, head_key = "asff", "level_0_header.conv.weight"
    elif "module_list.37.conv.weight" in state_dict:
        fusion, head_key = "baseline", "module_list.37.conv.weight"
    else:
        raise CheckpointError("state_dict has `module_list.*` keys but neither the ASFF (`level_0_fusion.*`) nor "
                              "the baseline (`module_list.37.*`) head: not a YOLOv3 Darknet checkpoint of the "
                              "official code (MobileNet models are not supported).")
    if head_key not in state_dict:
        raise CheckpointError(f"official state_dict lacks `{head_key}` (the level-0 prediction conv)")
    outputs = state_dict[head_key].shape[0]
    if outputs % 4 or outputs // 4 <= 5:
        raise CheckpointError(f"`{head_key}` has {outputs} outputs, not 4 * (5 + classes)")
    rfb = any(".rfb." in key for key in state_dict)
    stem = state_dict.get("module_list.0.conv.weight")
    width = 1.0 if stem is None or stem.shape[0] == 32 else stem.shape[0] / 32
    return ModelConfig(num_classes=outputs // 4 - 5, fusion=fusion, rfb=rfb, width=width)


def remap_official_state_dict(state_dict: dict) -> tuple[ModelConfig, dict]:
    """Official key layout to ours. Returns the config it needs and the remapped state_dict.

    Raises CheckpointError listing the keys with no counterpart.
    """
    config = official_config(state_dict)
    layout = "baseline" if config.fusion == "baseline" else "asff"
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
