"""PyTorch backend: ``torch:cpu`` and ``torch:cuda:N``.

The spec becomes a :class:`TorchGraph`, an ``nn.Module`` whose submodules sit
at the canonical dotted node names, so ``state_dict()`` keys *are* the canonical
weight names (a torchvision ResNet checkpoint loads as is). Each op is one small
module, read as a table from op to torch call (``MODULES``). The PopTorch backend
builds the same module with :func:`build_module`.

Speed without changing numbers beyond rounding: inference runs under
``torch.inference_mode`` on a copy with BatchNorm folded into the preceding
convolution, rebuilt only when the weights change; 2-d models run channels_last
(NHWC memory, NCHW semantics: measured faster for ResNet50 on the CPU with
oneDNN, and the layout cuDNN prefers); the optimizer uses torch's ``foreach``
kernels; losses of ``run_steps`` stay on the device until the end of the call.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from hal import spec as S
from hal.backend import Availability, Backend, Capabilities, Executable, Target, Weights, package_availability
from hal.errors import InputError, UnsupportedError
from hal.training import SGD, Adam, AdamW, TrainConfig
from hal.weights import check_weights

if TYPE_CHECKING:  # torch is imported lazily: listing backends must not import it
    import torch
    from torch import nn

DTYPES = {"fp32": "float32", "fp64": "float64", "bf16": "float32", "fp16": "float32"}


def _modules() -> dict[type[S.Op], type]:
    """op -> module class; defined on first use so that importing this file needs no torch."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def flat_pad(padding: S.Padding) -> list[int]:
        return [v for pair in reversed(padding) for v in pair]  # F.pad lists the last dim first

    def symmetric(padding: S.Padding, kernel: tuple[int, ...] | None = None) -> bool:
        same = all(a == b for a, b in padding)
        return same and (kernel is None or all(a <= k // 2 for (a, _), k in zip(padding, kernel)))

    class Conv(nn.Module):
        def __init__(self, op: S.Conv, in_shapes: list[S.Shape]) -> None:
            super().__init__()
            shapes = op.params(in_shapes)
            self.weight = nn.Parameter(torch.empty(shapes["weight"]))
            self.bias = nn.Parameter(torch.empty(shapes["bias"])) if op.bias else None
            self.fn = (F.conv1d, F.conv2d, F.conv3d)[len(op.kernel) - 1]
            self.op = op
            self.sym = symmetric(op.padding)
            self.pad = tuple(a for a, _ in op.padding) if self.sym else 0
            self.flat = flat_pad(op.padding)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.sym:
                x = F.pad(x, self.flat)
            return self.fn(x, self.weight, self.bias, self.op.stride, self.pad, self.op.dilation, self.op.groups)

    class BatchNorm(nn.Module):
        def __init__(self, op: S.BatchNorm, in_shapes: list[S.Shape]) -> None:
            super().__init__()
            c = in_shapes[0][0]
            self.weight, self.bias = nn.Parameter(torch.empty(c)), nn.Parameter(torch.empty(c))
            self.register_buffer("running_mean", torch.empty(c))
            self.register_buffer("running_var", torch.empty(c))
            self.op = op
            self.update_stats = True  # training mode: update running statistics?

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            op = self.op
            if not self.training:
                return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, op.eps)
            if self.update_stats:  # torch's rule is the canonical one: biased to normalise, unbiased to track
                return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, op.momentum, op.eps)
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, op.eps)

    class Activation(nn.Module):
        def __init__(self, op: S.Activation, in_shapes: list[S.Shape]) -> None:
            super().__init__()
            self.op = op

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            fn = self.op.fn
            if fn == "relu":
                return F.relu(x)
            if fn == "leaky_relu":
                return F.leaky_relu(x, self.op.alpha)
            if fn == "sigmoid":
                return torch.sigmoid(x)
            if fn == "tanh":
                return torch.tanh(x)
            if fn == "silu":
                return F.silu(x)
            return F.gelu(x, approximate=self.op.approximate)

    class MaxPool(nn.Module):
        def __init__(self, op: S.MaxPool, in_shapes: list[S.Shape]) -> None:
            super().__init__()
            self.op, self.fn = op, (F.max_pool1d, F.max_pool2d, F.max_pool3d)[len(op.kernel) - 1]
            self.native = symmetric(op.padding, op.kernel)  # torch pads max-pool with -inf itself
            self.flat = flat_pad(op.padding)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            op = self.op
            if self.native:
                return self.fn(x, op.kernel, op.stride, tuple(a for a, _ in op.padding))
            return self.fn(F.pad(x, self.flat, value=float("-inf")), op.kernel, op.stride)

    class AvgPool(nn.Module):
        def __init__(self, op: S.AvgPool, in_shapes: list[S.Shape]) -> None:
            super().__init__()
            self.op, self.fn = op, (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[len(op.kernel) - 1]
            # torch's avg_pool3d rejects an input smaller than the kernel, padded or not
            self.native = symmetric(op.padding, op.kernel) and all(n >= k for n, k in zip(in_shapes[0][1:], op.kernel))
            self.flat = flat_pad(op.padding)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            op = self.op
            if self.native:
                pad = tuple(a for a, _ in op.padding)
                return self.fn(x, op.kernel, op.stride, pad, count_include_pad=op.count_include_pad)
            total = self.fn(F.pad(x, self.flat), op.kernel, op.stride)
            if op.count_include_pad:
                return total
            ones = F.pad(torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device), self.flat)
            return total / self.fn(ones, op.kernel, op.stride)

    class GlobalAvgPool(nn.Module):
        def __init__(self, op: S.GlobalAvgPool, in_shapes: list[S.Shape]) -> None:
            super().__init__()
            self.dims = tuple(range(2, len(in_shapes[0]) + 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=self.dims)

    class Add(nn.Module):
        def __init__(self, op: S.Add, in_shapes: list[S.Shape]) -> None:
            super().__init__()

        def forward(self, *xs: torch.Tensor) -> torch.Tensor:
            out = xs[0] + xs[1]
            for x in xs[2:]:
                out = out + x
            return out

    class Concat(nn.Module):
        def __init__(self, op: S.Concat, in_shapes: list[S.Shape]) -> None:
            super().__init__()

        def forward(self, *xs: torch.Tensor) -> torch.Tensor:
            return torch.cat(xs, dim=1)

    class Flatten(nn.Module):
        def __init__(self, op: S.Flatten, in_shapes: list[S.Shape]) -> None:
            super().__init__()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.flatten(x, 1)  # logical (C, *spatial) order, whatever the memory format

    class Dense(nn.Module):
        def __init__(self, op: S.Dense, in_shapes: list[S.Shape]) -> None:
            super().__init__()
            shapes = op.params(in_shapes)
            self.weight = nn.Parameter(torch.empty(shapes["weight"]))
            self.bias = nn.Parameter(torch.empty(shapes["bias"])) if op.bias else None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.weight, self.bias)

    class Dropout(nn.Module):
        def __init__(self, op: S.Dropout, in_shapes: list[S.Shape]) -> None:
            super().__init__()
            self.rate = op.rate

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.dropout(x, self.rate, self.training)

    return {
        S.Conv: Conv, S.BatchNorm: BatchNorm, S.Activation: Activation, S.MaxPool: MaxPool,
        S.AvgPool: AvgPool, S.GlobalAvgPool: GlobalAvgPool, S.Add: Add, S.Concat: Concat,
        S.Flatten: Flatten, S.Dense: Dense, S.Dropout: Dropout,
    }


_MODULES: dict[type[S.Op], type] = {}


def _graph_class() -> type:
    import torch
    from torch import nn

    class TorchGraph(nn.Module):
        """The spec as an ``nn.Module``: one submodule per node, at its dotted name."""

        def __init__(self, spec: S.ModelSpec) -> None:
            super().__init__()
            if not _MODULES:
                _MODULES.update(_modules())
            self.spec = spec
            mods = {n.name: _MODULES[type(n.op)](n.op, spec.in_shapes(n)) for n in spec.nodes[1:]}
            for name in sorted(mods, key=lambda k: k.count(".")):  # parents before children
                parent_path, _, leaf = name.rpartition(".")
                parent = self
                for part in parent_path.split(".") if parent_path else ():
                    if not hasattr(parent, part):
                        parent.add_module(part, nn.Module())
                    parent = getattr(parent, part)
                if hasattr(parent, leaf):
                    raise UnsupportedError(f"node {name!r}: its name clashes with another node's module path")
                parent.add_module(leaf, mods[name])
            last: dict[str, int] = {}
            for i, n in enumerate(spec.nodes):
                for k in n.inputs:
                    last[k] = i
            self._plan = [
                (n.name, mods[n.name], n.inputs, tuple(dict.fromkeys(k for k in n.inputs if last[k] == i and k != spec.output)))
                for i, n in enumerate(spec.nodes[1:], start=1)
            ]

        def node_module(self, name: str) -> nn.Module:
            return self.get_submodule(name)

        def set_update_stats(self, flag: bool) -> None:
            for m in self.modules():
                if hasattr(m, "update_stats"):
                    m.update_stats = flag

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            vals = {self.spec.input.name: x}
            for name, mod, ins, free in self._plan:
                vals[name] = mod(*[vals[k] for k in ins])
                for k in free:
                    del vals[k]
            return vals[self.spec.output]

        def fused(self) -> "TorchGraph":
            """An inference copy with each BatchNorm that only reads a convolution
            (read by nothing else) folded into that convolution's weight and bias."""
            g = copy.deepcopy(self)
            nodes = {n.name: n for n in self.spec.nodes}
            consumers = self.spec.consumers()
            with torch.no_grad():
                for i, (name, mod, ins, free) in enumerate(g._plan):
                    node = nodes[name]
                    if not isinstance(node.op, S.BatchNorm):
                        continue
                    src = ins[0]
                    if not isinstance(nodes[src].op, S.Conv) or consumers[src] != [name]:
                        continue
                    conv = g.get_submodule(src)
                    scale = mod.weight / torch.sqrt(mod.running_var + node.op.eps)
                    bias = mod.bias - mod.running_mean * scale
                    if conv.bias is not None:
                        bias = bias + conv.bias * scale
                    conv.weight.mul_(scale.reshape(-1, *([1] * (conv.weight.dim() - 1))))
                    conv.bias = nn.Parameter(bias)
                    g._plan[i] = (name, nn.Identity(), ins, free)
            return g.eval()

    return TorchGraph


_GRAPH: list[type] = []


def build_module(spec: S.ModelSpec, weights: Mapping[str, np.ndarray], dtype: str = "float32") -> "nn.Module":
    """A ``TorchGraph`` for ``spec`` holding ``weights`` (canonical names) in ``dtype``, on the CPU."""
    import torch

    if not _GRAPH:
        _GRAPH.append(_graph_class())
    graph = _GRAPH[0](spec).to(getattr(torch, dtype))  # before loading: fp64 weights stay exact
    w = check_weights(spec, weights)
    graph.load_state_dict({k: torch.from_numpy(np.asarray(v, dtype=dtype)) for k, v in w.items()}, strict=True)
    return graph.to(getattr(torch, dtype))


def make_optimizer(params: Any, config: TrainConfig) -> "torch.optim.Optimizer":
    """The ``torch.optim`` optimizer of a hal config (the canonical semantics by definition)."""
    import torch

    o = config.optimizer
    if isinstance(o, SGD):
        return torch.optim.SGD(
            params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay, foreach=True
        )
    cls = torch.optim.AdamW if isinstance(o, AdamW) else torch.optim.Adam
    return cls(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, foreach=True)


def loss_fn(config: TrainConfig) -> Any:
    import torch.nn.functional as F

    return F.cross_entropy if config.loss == "cross_entropy" else F.mse_loss


class TorchExecutable(Executable):
    def __init__(
        self, spec: S.ModelSpec, weights: Weights, device: str, config: TrainConfig, fast: bool = True
    ) -> None:
        """``fast=False`` runs plain eager PyTorch (NCHW, no folding): the straightforward
        implementation the parity harness measures the float32 floor of training with."""
        import torch

        super().__init__(spec, Target("torch", device), config)
        self.device = torch.device(device)
        if config.precision == "fp16" and self.device.type != "cuda":
            raise UnsupportedError(f"torch:{device}: fp16 mixed precision needs CUDA; use bf16 on the CPU")
        self.dtype = getattr(torch, DTYPES[config.precision])
        self.np_dtype = np.dtype(DTYPES[config.precision])
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
        self.fast = fast
        self.channels_last = fast and len(spec.input_shape) == 3  # 2-d: measured faster on CPU (oneDNN) and CUDA
        self.module = build_module(spec, weights, DTYPES[config.precision]).to(self.device)
        if self.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.params = dict(self.module.named_parameters())
        self.optimizer = make_optimizer(self.params.values(), config) if self.params else None
        self.scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
        self.loss = loss_fn(config)
        self._infer: Any = None  # fused inference copy, rebuilt when weights change

    # -- I/O boundary -----------------------------------------------------------

    def _x(self, x: np.ndarray) -> "torch.Tensor":
        import torch

        t = torch.from_numpy(np.ascontiguousarray(x, dtype=self.np_dtype)).to(self.device, non_blocking=True)
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last else t

    def _y(self, y: np.ndarray) -> "torch.Tensor":
        import torch

        dtype = np.int64 if self.config.loss == "cross_entropy" else self.np_dtype
        return torch.from_numpy(np.ascontiguousarray(y, dtype=dtype)).to(self.device, non_blocking=True)

    def _ctx(self) -> Any:
        import contextlib

        import torch

        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    # -- the surface ----------------------------------------------------------------

    def predict(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        import torch

        x = self.check_x(x)
        if training:
            self.module.train()
            self.module.set_update_stats(False)
            with torch.no_grad(), self._ctx():
                out = self._forward(self._x(x))
        else:
            if self._infer is None:
                self._infer = self.module.fused() if self.fast else self.module.eval()
            with torch.inference_mode(), self._ctx():
                out = self._infer(self._x(x))
        return out.float().cpu().numpy() if out.dtype != torch.float64 else out.cpu().numpy()

    def _forward(self, x: "torch.Tensor") -> "torch.Tensor":
        """Training-mode forward; torch's complaint about BatchNorm over one value becomes a hal error."""
        try:
            return self.module(x)
        except ValueError as exc:
            raise InputError(f"{self.target}: {exc} (training-mode BatchNorm needs more than one value per channel)") from None

    def _accumulate(self, x: np.ndarray, y: np.ndarray, update_stats: bool) -> "torch.Tensor":
        """Forward/backward over the G micro-batches; leaves the mean gradient in ``.grad``."""
        x, y = self.check_xy(x, y)
        if self.optimizer is None:
            raise UnsupportedError(f"{self.target}: spec {self.spec.name!r} has no trainable parameters")
        g = self.config.grad_accum
        self.module.train()
        self.module.set_update_stats(update_stats)
        for p in self.params.values():
            p.grad = None
        total = None
        for xm, ym in zip(np.split(x, g), np.split(y, g)):
            with self._ctx():
                out = self._forward(self._x(xm))
            loss = self.loss(out.to(self.dtype), self._y(ym)) / g  # the loss in master precision
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total  # type: ignore[return-value]

    def loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> tuple[float, Weights]:
        loss = self._accumulate(x, y, update_stats=False)
        scale = float(self.scaler.get_scale()) if self.scaler else 1.0
        grads = {k: (p.grad.float() / scale if scale != 1.0 else p.grad).cpu().numpy() for k, p in self.params.items()}
        for p in self.params.values():
            p.grad = None
        return float(loss), grads

    def _step(self, x: np.ndarray, y: np.ndarray) -> "torch.Tensor":
        loss = self._accumulate(x, y, update_stats=True)
        lr = self.config.lr(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.step += 1
        self._infer = None
        return loss

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(self._step(x, y))

    def run_steps(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        import torch

        self.check_steps(xs, ys)
        losses = torch.stack([self._step(x, y) for x, y in zip(xs, ys)])  # one host sync per call
        return losses.double().cpu().numpy()

    def weights(self) -> Weights:
        return {k: v.detach().cpu().numpy().copy() for k, v in self.module.state_dict().items()}

    def load_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        import torch

        w = check_weights(self.spec, weights)
        with torch.no_grad():
            for k, v in self.module.state_dict().items():
                v.copy_(torch.from_numpy(np.asarray(w[k])))
        self._infer = None


class TorchBackend(Backend):
    """PyTorch eager, CPU and CUDA."""

    name = "torch"
    description = "PyTorch (CPU, CUDA)"

    @classmethod
    def availability(cls) -> Availability:
        return package_availability("torch", "torch", "pip install 'hal-cnn[torch]'")

    @classmethod
    def devices(cls) -> list[str]:
        import torch

        return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]

    @classmethod
    def capabilities(cls) -> Capabilities:
        return Capabilities(precisions=("fp32", "fp64", "bf16", "fp16"))

    @classmethod
    def compile(cls, spec: S.ModelSpec, weights: Weights, device: str, config: TrainConfig) -> Executable:
        return TorchExecutable(spec, weights, device, config)
