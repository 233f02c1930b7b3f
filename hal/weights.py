"""Canonical weights: ``"<node>.<param>" -> numpy array`` in PyTorch state_dict
names and layouts; seeded initialisation; safetensors files with the spec inside.
"""

from __future__ import annotations

import math
import os
import tempfile
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from hal.errors import SpecError, WeightsError
from hal.spec import Add, BatchNorm, Conv, Dense, ModelSpec

FORMAT = "hal-weights/1"
_IGNORED_SUFFIXES = (".num_batches_tracked",)  # torch BatchNorm bookkeeping, not state hal needs


def init_weights(spec: ModelSpec, seed: int = 0, residual_gamma: float = 1.0) -> dict[str, np.ndarray]:
    """Deterministic weights for ``spec``: the same numbers on every backend.

    Conv weights: He/Kaiming normal, fan-out, gain sqrt(2) (the torchvision ResNet
    init); conv biases 0. BatchNorm: gamma 1, beta 0, running mean 0, running var 1;
    ``residual_gamma`` sets gamma of every BatchNorm that feeds an Add (0 is the
    "zero-init residual" of Goyal et al. 2017). Dense: ``U(-1/sqrt(in), 1/sqrt(in))``
    for weight and bias (``torch.nn.Linear``'s default). Each array draws from its
    own stream keyed by (seed, name), so adding a node does not change the others.
    """
    dtype = np.dtype(spec.dtype if spec.dtype != "bfloat16" else "float32")
    residual = _residual_norms(spec)
    out: dict[str, np.ndarray] = {}
    for node in spec.nodes:
        op, ins = node.op, spec.in_shapes(node)
        shapes = {**op.params(ins), **op.buffers(ins)}
        for p, shape in shapes.items():
            name = f"{node.name}.{p}"
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            if isinstance(op, Conv) and p == "weight":
                fan_out = shape[0] * math.prod(shape[2:])
                arr = rng.normal(0.0, math.sqrt(2.0 / fan_out), shape)
            elif isinstance(op, Dense):
                bound = 1.0 / math.sqrt(ins[0][0])
                arr = rng.uniform(-bound, bound, shape)
            elif isinstance(op, BatchNorm) and p == "weight" and node.name in residual:
                arr = np.full(shape, residual_gamma)
            elif isinstance(op, BatchNorm) and p in ("weight", "running_var"):
                arr = np.ones(shape)
            else:
                arr = np.zeros(shape)
            out[name] = arr.astype(dtype)
    return out


def _residual_norms(spec: ModelSpec) -> set[str]:
    """BatchNorms that close a residual branch: of each Add's BatchNorm inputs, the one with most ancestors."""
    ancestors: dict[str, set[str]] = {}
    for n in spec.nodes:
        ancestors[n.name] = set().union(*([ancestors[i] | {i} for i in n.inputs] or [set()]))
    out = set()
    for n in spec.nodes:
        if isinstance(n.op, Add):
            norms = [i for i in n.inputs if isinstance(spec.node(i).op, BatchNorm)]
            if norms:
                out.add(max(norms, key=lambda i: len(ancestors[i])))
    return out


def check_weights(spec: ModelSpec, weights: Mapping[str, Any], where: str = "weights") -> dict[str, np.ndarray]:
    """Check every name, shape and dtype against the spec; return numpy arrays.

    Keys ending in ``num_batches_tracked`` (from a torch state_dict) are dropped.
    """
    if not isinstance(weights, Mapping):
        raise WeightsError(f"{where}: expected a mapping name -> array, got {type(weights).__name__}")
    want = spec.param_shapes()
    got = {k: v for k, v in weights.items() if not (isinstance(k, str) and k.endswith(_IGNORED_SUFFIXES))}
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    if missing or extra:
        msg = [f"{where} do not match spec {spec.name!r}:"]
        if missing:
            msg.append(f"missing {_few(missing)}")
        if extra:
            msg.append(f"unexpected {_few(extra)}")
        raise WeightsError(" ".join(msg))
    out = {}
    for k, shape in want.items():
        arr = _to_numpy(got[k])
        if tuple(arr.shape) != tuple(shape):
            raise WeightsError(f"{where}: {k!r} has shape {tuple(arr.shape)}, the spec expects {tuple(shape)}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise WeightsError(f"{where}: {k!r} has dtype {arr.dtype}, expected a floating type")
        if not np.all(np.isfinite(arr)):
            raise WeightsError(f"{where}: {k!r} holds non-finite values")
        out[k] = arr
    return out


def save_weights(path: str | os.PathLike, spec: ModelSpec, weights: Mapping[str, Any]) -> Path:
    """Write a safetensors file holding the weights and the spec (atomic: temp file, fsync, rename)."""
    from safetensors.numpy import save

    arrays = {k: np.ascontiguousarray(v) for k, v in check_weights(spec, weights).items()}
    meta = {"format": FORMAT, "spec": spec.to_json(), "spec_hash": spec.hash}
    data = save(arrays, metadata=meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)
    return path


def atomic_write(path: Path, data: bytes) -> None:
    """Write bytes so that ``path`` holds either the old or the new content, never a torn file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def load_weights(path: str | os.PathLike, spec: ModelSpec | None = None) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    """Read a hal safetensors file; returns ``(spec, weights)``, both checked.

    With ``spec`` given, the file's spec must be the same graph (same hash).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers/data
        raise WeightsError(f"{str(path)!r} is not a readable safetensors file: {exc}") from None
    if meta.get("format") != FORMAT or "spec" not in meta:
        raise WeightsError(f"{str(path)!r} is a safetensors file without hal metadata (format {FORMAT!r})")
    try:
        file_spec = ModelSpec.from_json(meta["spec"])
    except SpecError as exc:
        raise WeightsError(f"{str(path)!r}: the embedded spec is invalid: {exc}") from None
    if spec is not None and spec.hash != file_spec.hash:
        raise WeightsError(
            f"{str(path)!r} holds weights for spec {file_spec.name!r} ({file_spec.hash[:12]}), "
            f"not for {spec.name!r} ({spec.hash[:12]})"
        )
    return file_spec, check_weights(file_spec, arrays, where=str(path))


def from_state_dict(spec: ModelSpec, state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Canonical weights from a PyTorch ``state_dict`` (tensors or arrays), e.g. a torchvision checkpoint."""
    return check_weights(spec, state_dict, where="state_dict")


def _to_numpy(v: Any) -> np.ndarray:
    if isinstance(v, np.ndarray):
        return v
    if hasattr(v, "detach"):  # torch tensor
        return v.detach().cpu().numpy()
    try:
        return np.asarray(v)
    except Exception as exc:
        raise WeightsError(f"cannot convert {type(v).__name__} to an array: {exc}") from None


def _few(names: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return f"{shown}{f' and {len(names) - n} more' if len(names) > n else ''}"

