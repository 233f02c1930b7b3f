"""The PyTorch baselines that ``hal bench`` times hal's ``torch`` backend against in the
same run: torchvision's own model for every zoo name torchvision has (``resnet50``,
``mobilenet_v2``, ``efficientnet_b0``, ``densenet121``...), built with ``weights=None``
and the spec's ``num_classes``; a plainly hand-written ``small_cnn``, and a hand-written
ResNet (torchvision's layout) where torchvision is not installed.

Nothing here uses hal: it is what a PyTorch user would write. The ``state_dict``
names are torchvision's, hence hal's canonical names: hal's weights load unchanged
and each baseline computes hal's function. The usual eval loop (``eval()``,
``torch.inference_mode``) and SGD-momentum step; 2-d models run channels_last, as a
user tuning for speed does (measured on 2 CPU cores, batch 16, 224x224: 1.5x the
samples/s of NCHW for ``mobilenet_v2`` and ``efficientnet_b0`` in inference and
training, 1.35x/1.2x for ``resnet50``; it is also cuDNN's preferred layout).
``bf16``/``fp16``: the usual AMP recipe, ``torch.autocast`` around the forward and
the loss, and for fp16 ``torch.amp.GradScaler`` with its defaults (hal's
``LOSS_SCALE`` constants).
Without torchvision, the models other than the hand-written ones have no baseline.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hal.native import NoBaseline

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # precision -> autocast dtype
LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, depth: int = 50, num_classes: int = 1000) -> None:
        super().__init__()
        block = BasicBlock if depth < 50 else Bottleneck
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            self._stage(block, 64 * 2**i, n, 1 if i == 0 else 2) for i, n in enumerate(LAYERS[depth])
        )
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _stage(self, block: type, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SmallCNN(nn.Module):
    """hal's ``small_cnn`` written by hand; the stride-2 convolution pads like TF's "same"."""

    def __init__(self, num_classes: int, in_channels: int, input_size: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.branch = nn.Conv2d(8, 4, 1)
        self.conv3 = nn.Conv2d(12, 12, 3, stride=2)
        self.pool2 = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        side = input_size // 2
        self.pad3 = (side + 1) % 2  # TF "same", stride 2, kernel 3: pad (1 - side % 2, 1) per spatial dim
        out = (side + 1) // 2
        self.fc1 = nn.Linear(12 * out * out, 16)
        self.fc2 = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = x + F.leaky_relu(self.bn2(self.conv2(x)), 0.1)
        x = torch.cat([x, F.silu(self.branch(x))], 1)
        x = F.gelu(self.conv3(F.pad(x, (1 - self.pad3, 1, 1 - self.pad3, 1))), approximate="tanh")
        x = torch.tanh(torch.flatten(self.pool2(x), 1))
        return self.fc2(torch.sigmoid(self.fc1(x)))


class Native:
    """The usual eval loop and SGD-momentum training step, numpy in and out like hal;
    ``note`` names the model in the bench row. ``channels_last`` is for 2-d models;
    ``precision`` ``bf16``/``fp16`` runs both under autocast (fp16 with a GradScaler)."""

    def __init__(
        self, model: nn.Module, device: str = "cpu", note: str = "", channels_last: bool = False,
        precision: str = "fp32",
    ) -> None:
        self.device = torch.device(device)
        self.autocast = AUTOCAST[precision]
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.note = note

    def _x(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).to(self.device).contiguous(memory_format=self.memory_format)

    def _amp(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None)

    def predict(self, x: np.ndarray) -> np.ndarray:
        self.model.eval()
        with torch.inference_mode(), self._amp():
            return self.model(self._x(x)).float().cpu().numpy()

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self._amp():
            loss = F.cross_entropy(self.model(self._x(x)), torch.from_numpy(y).to(self.device))
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return loss.item()


def torchvision_model(model: str, num_classes: int) -> nn.Module:
    """torchvision's ``model`` with random weights and ``num_classes`` outputs; raises
    :class:`NoBaseline` if torchvision is missing or has no such model."""
    try:
        from torchvision import models
    except (ImportError, RuntimeError) as exc:  # RuntimeError: a torchvision built for another torch
        raise NoBaseline(f"torchvision cannot be imported ({exc}); pip install torchvision") from None
    if model not in models.list_models(module=models):
        raise NoBaseline(f"torchvision has no {model}")
    return models.get_model(model, weights=None, num_classes=num_classes)


def build(model: str, num_classes: int, device: str, input_shape: tuple[int, ...], precision: str = "fp32") -> Native:
    """The native twin of a hal zoo model in ``precision``: torchvision's model of that name, the
    hand-written ``small_cnn``, or without torchvision the hand-written ResNets (:class:`NoBaseline` if none)."""
    if precision not in AUTOCAST:
        raise NoBaseline(f"the torch baselines run {', '.join(AUTOCAST)}, not {precision}")
    depth = {f"resnet{d}": d for d in LAYERS}.get(model)
    if depth:
        try:  # torchvision's own ResNet where torchvision imports; the hand-written twin otherwise
            net, note = torchvision_model(model, num_classes), f"torchvision.models.{model}"
        except NoBaseline:
            net, note = ResNet(depth, num_classes), "hand-written torch ResNet (torchvision's layout)"
    elif model == "small_cnn":
        if len(input_shape) != 3 or input_shape[1] != input_shape[2]:
            raise NoBaseline(f"the hand-written small_cnn takes square (C, H, H) inputs, not {input_shape}")
        net, note = SmallCNN(num_classes, input_shape[0], input_shape[1]), "hand-written torch small_cnn"
    else:
        net, note = torchvision_model(model, num_classes), f"torchvision.models.{model}"
    channels_last = len(input_shape) == 3  # a 2-d model
    how = [*(["channels_last"] if channels_last else []), *([f"{precision} autocast"] if AUTOCAST[precision] else []),
           *(["GradScaler"] if precision == "fp16" else [])]
    return Native(net, device, f"{note} ({', '.join(how)})" if how else note, channels_last, precision)
