"""Deterministic weights in the official key layout, rebuilt from a manifest (`key<TAB>shape<TAB>dtype`).

The rule is the one the reference outputs in `official_asff_320.pt` were computed with: each tensor comes
from its own generator seeded by the CRC32 of its key, with scales that keep activations O(1) and spread the
fusion softmax and the scores over their whole range.
"""

from __future__ import annotations

import ast
import zlib
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
MANIFESTS = {name: HERE / f"checkpoint_manifest_{name}.txt"
             for name in ("asff", "asff_rfb", "baseline", "mobile", "mobile_asff")}


def read_manifest(path: Path) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")
        rows.append((key, tuple(ast.literal_eval(shape)), getattr(torch, dtype)))
    return rows


def manifest_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype,
                    batchnorm_prefixes: set[str] | frozenset[str] = frozenset()) -> torch.Tensor:
    """One tensor of the rule. A BatchNorm is any module whose keys include `running_var`
    (`batchnorm_prefixes`): the Darknet units name it `batch_norm`, the MobileNetV2 blocks number it."""
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=dtype)
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    uniform = torch.rand(shape, generator=generator)
    normal = torch.randn(shape, generator=generator)
    if key.rsplit(".", 1)[0] in batchnorm_prefixes:
        field = key.rsplit(".", 1)[1]
        value = {"weight": 0.5 + uniform, "bias": 0.1 * normal, "running_mean": 0.1 * normal,
                 "running_var": 0.5 + uniform}[field]
        return value.to(dtype)
    if len(shape) == 4:
        fan_in = shape[1] * shape[2] * shape[3]
        gain = 0.7
        if "weight_levels" in key:
            gain = 20.0
        elif key.endswith("header.conv.weight"):
            gain = 12.0
        elif "conv_offset" in key or "guide_wh" in key:
            gain = 0.5
        return (normal * gain / fan_in**0.5).to(dtype)
    return (0.1 * normal).to(dtype)


def manifest_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The official-layout state_dict for manifest `name` (a key of `MANIFESTS`)."""
    rows = read_manifest(MANIFESTS[name])
    batchnorms = {key.rsplit(".", 1)[0] for key, _, _ in rows if key.endswith(".running_var")}
    return {key: manifest_tensor(key, shape, dtype, batchnorms) for key, shape, dtype in rows}
