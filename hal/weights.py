"""Canonical weights: ``"<node>.<param>" -> numpy array`` in PyTorch state_dict
names and layouts; seeded initialisation; safetensors files with the spec inside.

A weights file (format ``hal-weights/2``) is a safetensors file whose metadata holds
``format``, ``spec`` (canonical JSON), ``spec_hash`` (its SHA-256) and ``checksum``:
a SHA-256 over the spec text and every tensor's name, dtype, shape and
little-endian bytes, in name order. Any change to the file, one bit included, fails
:func:`load_weights` with a :class:`~hal.errors.WeightsError` naming the file.
"""

from __future__ import annotations

import hashlib
import io
import heapq
import math
import numbers
import os
import re
import socket
import tempfile
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from hal.errors import SpecError, WeightsError
from hal.spec import Add, BatchNorm, ModelSpec

FORMAT = "hal-weights/2"
LEGACY_FORMAT = "hal-weights/1"  # spec and spec_hash, no checksum: still read (see load_weights)
_IGNORED_SUFFIXES = (".num_batches_tracked",)  # torch BatchNorm bookkeeping, not state hal needs


def init_weights(spec: ModelSpec, seed: int = 0, residual_gamma: float = 1.0) -> dict[str, np.ndarray]:
    """Deterministic weights for ``spec``: the same numbers on every backend.

    Each op declares its parameters' init (:meth:`hal.spec.Op.init`): e.g. Conv
    weights He/Kaiming normal, fan-out (the torchvision ResNet init), biases 0;
    BatchNorm gamma 1, beta 0, running mean 0, running var 1; Dense
    ``U(-1/sqrt(in), 1/sqrt(in))`` (``torch.nn.Linear``'s default); PReLU 0.25.
    ``residual_gamma`` sets gamma of every BatchNorm that closes a residual branch
    (0 is the "zero-init residual" of Goyal et al. 2017). Each array draws from its
    own stream keyed by (seed, name), so adding a node does not change the others.
    Raises :class:`~hal.errors.WeightsError` before allocating when the weights
    would not fit in this machine's memory.
    """
    _check_spec(spec)
    if not (isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and seed >= 0):
        raise WeightsError(f"init_weights: seed must be an int >= 0, got {seed!r}")
    if not (isinstance(residual_gamma, numbers.Real) and not isinstance(residual_gamma, bool)
            and math.isfinite(residual_gamma)):
        raise WeightsError(f"init_weights: residual_gamma must be a finite number, got {residual_gamma!r}")
    dtype = np.dtype(spec.dtype if spec.dtype != "bfloat16" else "float32")
    _check_fits(spec, dtype.itemsize)
    residual = _residual_norms(spec)
    out: dict[str, np.ndarray] = {}
    for node in spec.nodes:
        op, ins = node.op, spec.in_shapes(node)
        shapes = {**op.params(ins), **op.buffers(ins)}
        for p, shape in shapes.items():
            name = f"{node.name}.{p}"
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            init = op.init(p, shape, ins)
            if isinstance(op, BatchNorm) and p == "weight" and node.name in residual:
                arr = np.full(shape, residual_gamma)
            elif init.dist == "normal":
                arr = rng.normal(0.0, init.value, shape)
            elif init.dist == "uniform":
                arr = rng.uniform(-init.value, init.value, shape)
            else:
                arr = np.full(shape, init.value)
            out[name] = arr.astype(dtype)
    return out


def _residual_norms(spec: ModelSpec) -> set[str]:
    """BatchNorms that close a residual branch: of each Add's BatchNorm inputs, the one
    with most ancestors (the first such input on a tie)."""
    index = {n.name: i for i, n in enumerate(spec.nodes)}
    out = set()
    for n in spec.nodes:
        if isinstance(n.op, Add):
            norms = list(dict.fromkeys(i for i in n.inputs if isinstance(spec.node(i).op, BatchNorm)))
            if norms:
                extra = dict(zip(norms, _private_ancestors(spec, index, norms)))
                out.add(max(norms, key=extra.__getitem__))
    return out


def _private_ancestors(spec: ModelSpec, index: Mapping[str, int], seeds: list[str]) -> list[int]:
    """For each seed, how many of the nodes it depends on (itself included) not every seed
    depends on. These counts differ from the seeds' ancestor counts by one shared
    constant, so they order the seeds alike.

    Nodes are visited latest first (spec order is topological), so a node's set of
    seeds is complete when it is popped: every node reading it comes later. Once every
    node waiting is shared by all seeds, so is everything before them, and the search
    stops: a residual block costs its own size, not the size of the graph before it.
    """
    full = (1 << len(seeds)) - 1
    label = {s: 1 << k for k, s in enumerate(seeds)}
    heap = [-index[s] for s in seeds]
    heapq.heapify(heap)
    counts = [0] * len(seeds)
    partial = len(seeds) if len(seeds) > 1 else 0  # nodes waiting whose set of seeds is not full
    while partial:
        name = spec.nodes[-heapq.heappop(heap)].name
        mask = label[name]
        if mask != full:
            partial -= 1
            for k in range(len(seeds)):
                counts[k] += mask >> k & 1
        for i in spec.node(name).inputs:
            old = label.get(i)
            if old is None:
                heapq.heappush(heap, -index[i])
            new = mask if old is None else old | mask
            partial += (new != full) - (old is not None and old != full)
            label[i] = new
    return counts


def _check_spec(spec: Any) -> None:
    if not isinstance(spec, ModelSpec):
        raise SpecError(f"expected a hal.ModelSpec, got {type(spec).__name__}")


def _check_fits(spec: ModelSpec, itemsize: int) -> None:
    """Refuse, before allocating, weights larger than this machine's physical memory."""
    need = sum(math.prod(s) for s in spec.param_shapes().values()) * itemsize
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): nothing to compare with
        return
    if need > have:
        raise WeightsError(
            f"the weights of spec {spec.name!r} need {need / 2**30:,.1f} GiB; this machine has {have / 2**30:,.1f} GiB"
        )


def check_weights(spec: ModelSpec, weights: Mapping[str, Any], where: str = "weights") -> dict[str, np.ndarray]:
    """Check every name, shape and dtype against the spec; return numpy arrays.

    Keys ending in ``num_batches_tracked`` (from a torch state_dict) are dropped;
    bfloat16 arrays and tensors (no numpy dtype) become float32, which holds them exactly.
    """
    _check_spec(spec)
    where = str(where)
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
        arr = _to_numpy(got[k], f"{where}: {k!r}")
        if tuple(arr.shape) != tuple(shape):
            raise WeightsError(f"{where}: {k!r} has shape {tuple(arr.shape)}, the spec expects {tuple(shape)}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise WeightsError(f"{where}: {k!r} has dtype {arr.dtype}, expected a floating type")
        if not np.all(np.isfinite(arr)):
            raise WeightsError(f"{where}: {k!r} holds non-finite values")
        out[k] = arr
    return out


def save_weights(path: str | os.PathLike, spec: ModelSpec, weights: Mapping[str, Any]) -> Path:
    """Write a safetensors file holding the weights, the spec and a checksum (atomic:
    temp file, fsync, rename). A failure to write (a parent that is a file, a full
    disk) raises :class:`~hal.errors.WeightsError` naming the path; the old file stays."""
    from safetensors.numpy import save

    path = _path(path)
    arrays = {k: _little_endian(v) for k, v in check_weights(spec, weights).items()}
    text = spec.to_json()
    meta = {"format": FORMAT, "spec": text, "spec_hash": spec.hash, "checksum": _checksum(text, arrays)}
    data = save(arrays, metadata=meta)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)
    except OSError as exc:
        raise WeightsError(f"cannot write weights to {str(path)!r}: {exc}") from exc
    return path


def atomic_savefig(fig: Any, path: str | os.PathLike, dpi: int = 120) -> Path:
    """A matplotlib figure as a PNG at ``path``, written with :func:`atomic_write`; closes nothing."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buffer.getvalue())
    return path


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes so that ``path`` holds either the old or the new content, never a torn file.

    The temporary file beside ``path`` is ``.<name>.<pid>-<host>.<random>.tmp``. A
    writer killed before its rename leaves one behind; the next write of the same
    path removes those whose process is gone (same host, pid not running), never
    the file of a live writer.
    """
    path = Path(path)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-{_host()}.", suffix=".tmp", dir=path.parent)
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


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())


def _remove_stale_temporaries(path: Path) -> None:
    """Remove the temporaries of ``path`` left by writers on this host that no longer run."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"(\d+)-([A-Za-z0-9-]*)\.[a-z0-9_]+\.tmp")
    host = _host()
    try:
        names = [p.name for p in path.parent.iterdir()]
    except OSError:  # no folder yet, or unreadable: nothing to clean; the write reports real problems
        return
    for name in names:
        m = pattern.fullmatch(name)
        if m and m[2] == host and not _running(int(m[1])):
            try:
                (path.parent / name).unlink()
            except OSError:  # gone already (another writer cleaned it) or not ours to remove
                pass


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists on this host; True where that cannot be asked."""
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; not a pid
        return True
    return True


def load_weights(path: str | os.PathLike, spec: ModelSpec | None = None) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    """Read a hal safetensors file; returns ``(spec, weights)``, both checked.

    Checks that the checksum matches the spec text and tensors, that ``spec_hash``
    is the hash of the embedded spec, that ``spec`` (if given) is the same graph
    (same hash), and the arrays against the spec; any failure is a
    :class:`~hal.errors.WeightsError` naming the file and the check.

    Files of the previous format ``hal-weights/1`` (no checksum) still load with every
    check but the checksum: refusing them would strand trained checkpoints, and their
    spec is still verified against its stored hash. Saving them again adds a checksum.
    """
    from safetensors import safe_open

    if spec is not None:
        _check_spec(spec)
    path = _path(path)
    where = repr(str(path))
    if not path.is_file():
        raise WeightsError(f"weights file {where} does not exist" if not path.exists() else f"{where} is not a file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers/data
        raise WeightsError(f"{where} is not a readable safetensors file: {exc}") from None
    fmt = meta.get("format")
    if fmt not in (FORMAT, LEGACY_FORMAT):
        raise WeightsError(f"{where} is a safetensors file without hal metadata: format {fmt!r}, expected {FORMAT!r}")
    missing = [k for k in ("spec", "spec_hash", "checksum") if k not in meta and (k != "checksum" or fmt == FORMAT)]
    if missing:
        raise WeightsError(f"{where}: the hal metadata lacks {missing} (a corrupt or edited file)")
    if fmt == FORMAT and _checksum(meta["spec"], arrays) != meta["checksum"]:
        raise WeightsError(f"{where}: checksum mismatch: the tensors or the spec changed after saving (a corrupt file)")
    try:
        file_spec = ModelSpec.from_json(meta["spec"])
    except SpecError as exc:
        raise WeightsError(f"{where}: the embedded spec is invalid: {exc}") from None
    if file_spec.hash != meta["spec_hash"]:
        raise WeightsError(f"{where}: the embedded spec does not match its stored spec_hash (a corrupt or edited file)")
    if spec is not None and spec.hash != file_spec.hash:
        raise WeightsError(
            f"{where} holds weights for spec {file_spec.name!r} ({file_spec.hash[:12]}), "
            f"not for {spec.name!r} ({spec.hash[:12]})"
        )
    return file_spec, check_weights(file_spec, arrays, where=str(path))


def _path(path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise WeightsError(f"a weights path must be a str or os.PathLike, got {type(path).__name__}")
    return Path(path)


def _little_endian(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))


def _checksum(spec_text: str, arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the spec text and each tensor's name, dtype, shape and little-endian bytes, in name order."""
    h = hashlib.sha256()

    def field(b: bytes | memoryview) -> None:  # length-prefixed: no two inputs give one stream
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    field(spec_text.encode())
    for name in sorted(arrays):
        arr = _little_endian(arrays[name])
        for part in (name, arr.dtype.name, ",".join(map(str, arr.shape))):
            field(part.encode())
        field(memoryview(arr).cast("B"))
    return "sha256:" + h.hexdigest()


def from_state_dict(spec: ModelSpec, state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Canonical weights from a PyTorch ``state_dict`` (tensors or arrays, float32/64,
    float16 or bfloat16), e.g. a torchvision checkpoint."""
    return check_weights(spec, state_dict, where="state_dict")


def _to_numpy(v: Any, where: str) -> np.ndarray:
    try:
        if hasattr(v, "detach"):  # torch tensor; numpy has no bfloat16
            t = v.detach().cpu()
            return (t.float() if str(t.dtype) == "torch.bfloat16" else t).numpy()
        arr = np.asarray(v)
    except Exception as exc:  # whatever the object's own conversion raises
        raise WeightsError(f"{where}: cannot convert a {type(v).__name__} to an array: {exc}") from None
    return arr.astype(np.float32) if arr.dtype.name == "bfloat16" else arr  # ml_dtypes' (JAX) bfloat16


def _few(names: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return f"{shown}{f' and {len(names) - n} more' if len(names) > n else ''}"

