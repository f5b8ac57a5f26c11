"""Backbone + head classifiers: ``create_model(backbone, weights, freeze)``.

The head: global average pooling → Linear(F, 256) → ReLU → Dropout(0.5) → Linear(256, n_outputs),
with one output (a logit) for two classes and one per class otherwise.
"""

from __future__ import annotations

import urllib.error
from pathlib import Path
from typing import Sequence

import torch
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode

from bonetumor.errors import BonetumorError
from bonetumor.model.serialization import is_bonetumor_checkpoint, read_checkpoint_file
from bonetumor.runtime.batchnorm import keeps_statistics
from bonetumor.runtime.recompute import recompute_forward

# What each backbone is, in one place:
#   features   feature width after global average pooling (the head's input)
#   classifier torchvision's classifier module, replaced by the head
#   cam_layer  the block whose output Grad-CAM explains by default
#   stages     five stages of module names (under ``Classifier.backbone``), stem first, as its
#              torchvision forward runs them (for ``--recompute-stages``)
#   relu_tail  its forward applies a ReLU after the last stage, before pooling
BACKBONES = {
    "resnet50": {"features": 2048, "classifier": "fc", "cam_layer": "backbone.layer4",
                 "stages": [("conv1", "bn1", "relu", "maxpool"), ("layer1",), ("layer2",), ("layer3",), ("layer4",)],
                 "relu_tail": False},
    "densenet121": {"features": 1024, "classifier": "classifier", "cam_layer": "backbone.features",
                    "stages": [("features.conv0", "features.norm0", "features.relu0", "features.pool0"),
                               ("features.denseblock1", "features.transition1"),
                               ("features.denseblock2", "features.transition2"),
                               ("features.denseblock3", "features.transition3"),
                               ("features.denseblock4", "features.norm5")],
                    "relu_tail": True},
    "efficientnet_b0": {"features": 1280, "classifier": "classifier", "cam_layer": "backbone.features",
                        "stages": [("features.0",), ("features.1", "features.2"), ("features.3",),
                                   ("features.4", "features.5"), ("features.6", "features.7", "features.8")],
                        "relu_tail": False},
}


class Classifier(nn.Module):
    """A torchvision backbone (returning pooled features) followed by the small dense head."""

    def __init__(self, backbone: nn.Module, n_features: int, n_outputs: int, hidden: int = 256, dropout: float = 0.5):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(
            nn.Linear(n_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, n_outputs)
        )

    # Temperature fitted on validation after training (1 = none). A plain attribute, not a
    # buffer: it lives in the checkpoint beside the weights, so old checkpoints load unchanged.
    temperature: float = 1.0
    # Set by create_model / fit (plain attributes too): the first ``recompute_stages`` backbone
    # stages are recomputed in backward while training (see runtime/recompute.py).
    backbone_name: str = ""
    recompute_stages: int = 0
    # "frozen": every BatchNorm keeps its running statistics while training (see runtime/batchnorm.py).
    bn_statistics: str = "batch"
    # A checkpoint with the out-of-distribution check gives the model an ``ood`` submodule
    # (model/ood.py): read it with getattr(model, "ood", None). No class default here, as a class
    # attribute would hide the submodule that nn.Module keeps apart.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute_stages and self.training and torch.is_grad_enabled():
            spec = BACKBONES[self.backbone_name]
            feats = recompute_forward(self.backbone, spec["stages"], self.recompute_stages, x, spec["relu_tail"])
        else:
            feats = self.backbone(x)
        logits = self.head(feats)
        return logits if self.temperature == 1.0 else logits / self.temperature

    def train(self, mode: bool = True) -> "Classifier":
        """Like nn.Module.train, but BatchNorm layers that keep their running statistics
        (those of frozen blocks, or all with ``bn_statistics == "frozen"``: see
        ``batchnorm.keeps_statistics``) stay in eval mode."""
        super().train(mode)
        if mode:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and keeps_statistics(m, self.bn_statistics):
                    m.eval()
        return self


def _stride_kwargs(backbone: str, output_stride: int) -> dict:
    """torchvision arguments that give the requested output stride (dilation replaces stride)."""
    if output_stride == 32:
        return {}
    if backbone == "resnet50" and output_stride in (16, 8):
        return {"replace_stride_with_dilation": [False, output_stride == 8, True]}
    allowed = "32, 16 or 8" if backbone == "resnet50" else "32"
    raise BonetumorError(f"--output-stride {output_stride}: {backbone} supports {allowed}")


def _imagenet_state_dict(backbone: str) -> dict:
    """ImageNet weights through torchvision's weights API (downloaded once, then cached)."""
    weights = torchvision.models.get_model_weights(backbone).DEFAULT
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise BonetumorError(
            f"ImageNet weights for {backbone} are not cached at {cache} and could not be downloaded "
            f"({reason}). On a connected machine run `bonetumor fetch-weights --backbone {backbone}` "
            f"(or download {weights.url}) and copy the file to {cache} here, or pass --weights PATH "
            f"to that file; --weights none trains from random initialisation"
        ) from None


def _file_state_dict(path: str, backbone: str) -> tuple[dict, bool]:
    """State dict from a torchvision weights file or a bonetumor checkpoint.

    Returns (state_dict, is_bonetumor). Loaded with weights_only=True: never executes code.
    """
    obj = read_checkpoint_file(path)  # a bonetumor checkpoint is checked against its checksum
    if is_bonetumor_checkpoint(obj):
        if obj["backbone"] != backbone:
            raise BonetumorError(f"{path}: checkpoint has backbone {obj['backbone']}, not {backbone}")
        return obj["model"], True
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BonetumorError(f"{path}: not a state_dict of tensors nor a bonetumor checkpoint")
    return obj, False


def _load_backbone_weights(net: nn.Module, state: dict, backbone: str, source: str) -> None:
    head = BACKBONES[backbone]["classifier"]
    state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    expected = {k for k in net.state_dict() if not k.startswith(head + ".")}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise BonetumorError(
            f"{source}: weights do not fit {backbone} ({len(missing)} missing, {len(unexpected)} unexpected "
            f"keys, e.g. {example!r})"
        )
    try:
        net.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise BonetumorError(f"{source}: weights do not fit {backbone} ({str(e).splitlines()[-1].strip()})") from None


def create_model(
    backbone: str = "resnet50",
    weights: str = "imagenet",
    freeze: str = "auto",
    unfreeze: Sequence[str] = (),
    n_outputs: int = 1,
    hidden: int = 256,
    dropout: float = 0.5,
    output_stride: int = 32,
) -> Classifier:
    """Build a classifier.

    Args:
        backbone: resnet50, densenet121 or efficientnet_b0 (torchvision).
        weights: ``imagenet`` (torchvision weights API), ``none`` (random) or a file path
            (a torchvision state_dict, or a bonetumor checkpoint whose backbone is reused).
        freeze: ``backbone`` (train the head only), ``none``, or ``auto`` (``backbone`` unless
            the weights are random: see ``resolve_freeze``).
        unfreeze: backbone blocks to train even when frozen, e.g. ``["layer4", "layer3"]``.
        n_outputs: 1 for a binary task (one logit), else the number of classes.
        output_stride: input pixels per cell of the last feature map: 32 (the usual), or for
            resnet50 16 or 8, which dilates the last block(s) instead of striding (as DeepLab
            does). The weights are the same shape, so ImageNet weights still load; Grad-CAM
            maps get 2x (4x) finer, at about 1.3x (3x) the compute.

    Raises:
        BonetumorError: unknown backbone/block, unusable weights file, output stride the
            backbone cannot give, or ImageNet weights neither cached nor downloadable.
    """
    if backbone not in BACKBONES:
        raise BonetumorError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    spec = BACKBONES[backbone]
    net = torchvision.models.get_model(backbone, weights=None, **_stride_kwargs(backbone, output_stride))
    w = str(weights)
    bonetumor_state = None
    if w.lower() == "imagenet":
        _load_backbone_weights(net, _imagenet_state_dict(backbone), backbone, f"ImageNet weights for {backbone}")
    elif w.lower() != "none":
        if not Path(w).is_file():
            raise BonetumorError(f"--weights {w}: no such file (use imagenet, none or a file path)")
        state, is_ours = _file_state_dict(w, backbone)
        if is_ours:
            bonetumor_state = state
        else:
            _load_backbone_weights(net, state, backbone, w)
    setattr(net, spec["classifier"], nn.Identity())
    model = Classifier(net, spec["features"], n_outputs, hidden, dropout)
    model.backbone_name = backbone
    if bonetumor_state is not None:
        back = {k[len("backbone."):]: v for k, v in bonetumor_state.items() if k.startswith("backbone.")}
        _load_backbone_weights(model.backbone, back, backbone, w)
    set_trainable(model, resolve_freeze(freeze, weights), unfreeze)
    return model


def resolve_freeze(setting: str, weights: str) -> str:
    """``backbone`` or ``none`` for ``--freeze setting``: ``auto`` freezes pretrained weights, whose
    features mean something, and trains random ones, whose frozen features would mean nothing."""
    if setting != "auto":
        return setting
    return "none" if str(weights).lower() == "none" else "backbone"


def set_trainable(model: Classifier, freeze: str, unfreeze: Sequence[str] = ()) -> None:
    """Freeze the backbone (``freeze='backbone'``) except the named blocks; the head always trains."""
    if freeze not in ("backbone", "none"):
        raise BonetumorError(f"--freeze must be 'backbone' or 'none', not {freeze!r}")
    for p in model.backbone.parameters():
        p.requires_grad = freeze == "none"
    names = dict(model.backbone.named_modules())
    for block in unfreeze:
        if block not in names or not block:
            valid = [n for n, _ in model.backbone.named_children()]
            raise BonetumorError(f"--unfreeze {block!r}: no such block; valid blocks are {', '.join(valid)}")
        for p in names[block].parameters():
            p.requires_grad = True
    for p in model.head.parameters():
        p.requires_grad = True


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def fetch_imagenet_weights(backbone: str) -> Path:
    """Download (or find cached) ImageNet weights for ``backbone``; returns the cached file path."""
    if backbone not in BACKBONES:
        raise BonetumorError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    _imagenet_state_dict(backbone)
    weights = torchvision.models.get_model_weights(backbone).DEFAULT
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


class _SkipMetaInit(TorchFunctionMode):
    """Leaves tensors on the meta device uninitialised. A model built there only to be given
    saved tensors needs no random init, and meta tensors have no kernel for ``normal_``:
    PyTorch runs a Python decomposition per call, a sixth of a second for ResNet50's 53
    convolutions, paid by every one-image ``predict``. A torch-function mode, unlike patching
    ``torch.nn.init``, is local to this thread and to meta tensors."""

    INIT = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.fill_, torch.Tensor.zero_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.INIT and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


def create_empty_model(backbone: str = "resnet50", n_outputs: int = 1, hidden: int = 256, dropout: float = 0.5,
                       output_stride: int = 32) -> Classifier:
    """``create_model``'s structure on the meta device: no memory and no random init, for saved
    tensors to be given with ``load_state_dict(..., assign=True)``, or to learn its shapes."""
    with torch.device("meta"), _SkipMetaInit():
        return create_model(backbone, "none", "backbone", (), n_outputs, hidden, dropout, output_stride)
