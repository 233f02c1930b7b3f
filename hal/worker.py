"""Run a function in a fresh worker process, so that a framework's crash is an error, not a dead run.

:func:`run_isolated` calls a picklable module-level function in a new Python
process and returns its result. The worker is spawned, not forked: it inherits
no state from the parent, whatever frameworks the parent has loaded. Unlike
``multiprocessing``'s spawn it does not re-import the parent's ``__main__``, so
scripts need no ``if __name__ == "__main__"`` guard and stdin or notebook code
works; the worker's ``sys.path`` is the parent's. What can go wrong comes back
as a hal exception:

* the function raises a :class:`~hal.errors.HalError`: the same class is raised
  here, message and attributes intact;
* it raises anything else: a :class:`~hal.errors.HalError` naming the exception
  type and message;
* the process dies (segfault, abort, out-of-memory kill, ``os._exit``): a
  :class:`~hal.errors.WorkerError` naming the signal or exit status and, from the
  worker's stderr, the fatal error and the frame it happened in (Python's
  faulthandler writes the crashing stack there); the stderr tail is on the
  exception as ``worker_stderr``.

Either way the worker's traceback text is on the exception as ``worker_traceback``
(for debugging; users see the message). Backends registered by hand
(:func:`hal.registry.register_backend`) with a class importable by name are
registered in the worker too. The worker ignores Ctrl-C and exits when its parent
dies; an interrupted parent terminates it.

:func:`run_inline` has the same contract in the current process, for callers
that choose not to pay for a process start.

Processes that serve more than one call (:mod:`hal.distributed`'s replicas) are
built from the same parts: :func:`spawn` starts one, :func:`become_worker` and
:func:`exit_worker` bracket its life, :func:`error_payload` packs an exception
that :func:`error_from_payload` raises again in the parent, and
:func:`death_error` says how a process died.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from multiprocessing.connection import Connection, wait
from typing import IO, Any, Callable, Mapping, NoReturn, Sequence, TypeVar

from hal.errors import HalError, WorkerError

T = TypeVar("T")
ErrorPayload = tuple[bytes | None, str, str]  # an exception as a worker sends it: see error_payload
STDERR_TAIL = 4000  # characters of a dead worker's stderr kept on its WorkerError
_EXIT_GRACE_S = 10.0  # seconds a worker may take to exit before it is terminated

Progress = Callable[[str], None]


def describe(exc: BaseException) -> str:
    """A one-line account of ``exc`` for a report row: a hal error's message as is,
    anything else prefixed with its type (``RuntimeError: ...``)."""
    return str(exc) if isinstance(exc, HalError) else f"{type(exc).__name__}: {exc}"


def run_inline(fn: Callable[..., T], *args: Any, label: str = "", progress: Progress | None = None, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` here, with :func:`run_isolated`'s error contract: a
    non-hal exception becomes a :class:`HalError` naming its type (chained to it)."""
    if progress is not None:
        kwargs["progress"] = progress
    try:
        return fn(*args, **kwargs)
    except HalError:
        raise
    except Exception as exc:
        err = HalError(_prefix(label, describe(exc)))
        err.worker_traceback = traceback.format_exc()  # type: ignore[attr-defined]
        raise err from exc


def run_isolated(
    fn: Callable[..., T], *args: Any, label: str = "", progress: Progress | None = None, **kwargs: Any
) -> T:
    """``fn(*args, **kwargs)`` in a fresh Python process; see the module docstring.

    ``fn``, its arguments and its result must pickle (``fn`` defined at module
    level in an importable module). ``label`` names the work in error messages
    (e.g. the target). With ``progress``, ``fn`` is also passed ``progress=``: a
    callable that relays each message to ``progress`` in this process.
    """
    try:
        request = pickle.dumps((portable_registry(), fn, args, kwargs, progress is not None), pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise WorkerError(_prefix(label, f"could not start a worker process: {describe(exc)}")) from exc
    req_r, req_w = os.pipe()  # request; the worker exits when this closes (parent done or dead)
    res_r, res_w = os.pipe()  # progress messages and the result
    with tempfile.TemporaryFile(prefix="hal-worker-", suffix=".stderr") as err_file:
        try:
            proc = spawn(f"from hal.worker import _serve; _serve({req_r}, {res_w})", (req_r, res_w), err_file,
                         _prefix(label, "could not start a worker process"))
        except WorkerError:
            os.close(req_w)
            os.close(res_r)
            raise
        requests, results = Connection(req_w, readable=False), Connection(res_r, writable=False)
        finished = False
        try:
            message = _exchange(requests, results, request, progress)
            finished = True
        finally:  # also on KeyboardInterrupt: no worker outlives the call
            requests.close()
            results.close()
            _stop(proc, _EXIT_GRACE_S if finished else 0.0)
        err_file.seek(0)
        stderr = err_file.read().decode(errors="replace")
    if message is None:
        raise death_error(_prefix(label, "the worker process"), proc.returncode, stderr)
    if stderr:  # warnings and logs of a worker that ended normally are not lost
        sys.stderr.write(stderr)
    kind, payload = message
    if kind == "ok":
        return payload
    raise error_from_payload(payload, label)


def _prefix(label: str, text: str) -> str:
    return f"{label}: {text}" if label else text


def spawn(
    entry: str, child_fds: Sequence[int], stderr: IO[bytes], failure: str, env: Mapping[str, str] | None = None
) -> subprocess.Popen:
    """Start a worker process running ``python -X faulthandler -c entry``.

    Spawned, not forked, with this process's ``sys.path`` as its ``PYTHONPATH`` and ``env`` added to
    this process's environment; stdin closed, stderr to ``stderr``. ``child_fds`` (the pipe ends the
    worker uses) are passed to it and closed here. Raises :class:`WorkerError` (``failure``: the cause)
    if the process cannot start."""
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), **(env or {}))
    try:
        return subprocess.Popen([sys.executable, "-X", "faulthandler", "-c", entry], stdin=subprocess.DEVNULL,
                                stderr=stderr, pass_fds=tuple(child_fds), env=full_env)
    except OSError as exc:
        raise WorkerError(f"{failure}: {exc}") from exc
    finally:
        for fd in child_fds:
            os.close(fd)


def portable_registry() -> dict[str, type]:
    """The hand-registered backends whose classes pickle (by reference: importable by name), for
    :func:`become_worker` in a worker."""
    from hal.registry import _registered

    out = {}
    for name, cls in _registered.items():
        try:
            pickle.dumps(cls)
        except Exception:  # a class defined inside a function cannot reach a worker
            continue
        out[name] = cls
    return out


def become_worker(lifeline: Connection, registered: Mapping[str, type]) -> None:
    """In a worker's entry point, once its request is read: ignore Ctrl-C (the parent decides when
    workers stop), exit at once when the parent closes ``lifeline`` (it is gone, or done with the
    worker), and register the parent's :func:`portable_registry` backends."""
    from hal.registry import _registered

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(lifeline,), name="hal-worker-watchdog", daemon=True).start()
    _registered.update(registered)


def exit_worker() -> NoReturn:
    """End a worker: flush its output and exit without the interpreter's teardown (slow, and a
    framework's can crash after the work is done or hang on peers that are gone)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def error_payload(exc: Exception) -> ErrorPayload:
    """``exc`` as a worker sends it (call in its ``except`` block): the pickled ``(class, args,
    attributes)`` of a :class:`HalError` (None for other exceptions or if it does not pickle), a
    one-line account (:func:`describe`) and the traceback."""
    blob = None
    if isinstance(exc, HalError):
        try:
            blob = pickle.dumps((type(exc), exc.args, dict(vars(exc))))
        except Exception:  # an attribute that does not pickle: the message will do
            pass
    return blob, describe(exc), traceback.format_exc()


def error_from_payload(payload: ErrorPayload, context: str = "", cls: type[HalError] = HalError) -> HalError:
    """The exception an :func:`error_payload` stands for, to raise in the parent: the worker's
    :class:`HalError` rebuilt as (class, args, attributes) without calling its ``__init__``
    (``NonFiniteError(message, step)`` takes other arguments than its args), else ``cls`` with the
    one-line account after ``context``. The worker's traceback is on it as ``worker_traceback``."""
    blob, text, tb = payload
    err = None
    if blob is not None:
        try:
            error_cls, args, state = pickle.loads(blob)
        except Exception:  # its class cannot be imported here: the message will do
            pass
        else:
            err = error_cls.__new__(error_cls, *args)
            err.args = args
            vars(err).update(state)
    if err is None:
        err = cls(_prefix(context, text))
    err.worker_traceback = tb  # type: ignore[attr-defined]
    return err


def death_error(what: str, returncode: int | None, stderr: str, consequence: str = "") -> WorkerError:
    """``WorkerError("<what> died (<signal or exit status>): <crash summary><consequence>")`` for a worker
    that is gone, with the tail of its ``stderr`` on it as ``worker_stderr``."""
    summary = _crash_summary(stderr)
    err = WorkerError(f"{what} died ({_exit_reason(returncode)})" + (f": {summary}" if summary else "") + consequence)
    err.worker_stderr = stderr[-STDERR_TAIL:]  # type: ignore[attr-defined]
    return err


def _exchange(
    requests: Connection, results: Connection, request: bytes, progress: Progress | None
) -> tuple[str, Any] | None:
    """Send the request; relay progress; return the final message, or None if the worker died."""
    try:
        requests.send_bytes(request)
        while True:
            kind, payload = results.recv()
            if kind != "progress":
                return kind, payload
            if progress is not None:
                progress(payload)
    except (EOFError, BrokenPipeError):  # the worker is gone and its end of the pipe closed
        return None


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    """Wait up to ``grace_s`` for a worker to exit; then terminate (then kill) it."""
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(_EXIT_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = ", e.g. by the out-of-memory killer" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit status {code}"


def _crash_summary(stderr: str) -> str:
    """One line from a dead worker's stderr: faulthandler's fatal error and the innermost
    frame of the crashing thread, else the last line written."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    fatal = next((i for i, line in enumerate(lines) if line.startswith("Fatal Python error")), None)
    if fatal is None:
        return lines[-1] if lines else ""
    current = next((i for i in range(fatal, len(lines)) if lines[i].startswith("Current thread")), None)
    frame = lines[current + 1] if current is not None and current + 1 < len(lines) else ""
    return lines[fatal] + (f", in {frame}" if frame.startswith("File ") else "")


def _serve(req_fd: int, res_fd: int) -> None:
    """:func:`run_isolated`'s worker: read the request, call ``fn``, send ``("ok", result)`` or
    ``("error", payload)``, exit."""
    requests, send = Connection(req_fd, writable=False), Connection(res_fd, readable=False)
    registered, fn, args, kwargs, relay = pickle.loads(requests.recv_bytes())
    become_worker(requests, registered)  # the request pipe is the lifeline: the parent closes it when done
    if relay:
        kwargs["progress"] = lambda message: send.send(("progress", str(message)))
    try:
        send.send(("ok", fn(*args, **kwargs)))
    except Exception as exc:
        send.send(("error", error_payload(exc)))
    exit_worker()


def _exit_with_parent(lifeline: Connection) -> None:
    """Exit when the parent closes ``lifeline``: it is gone (killed, crashed) or done with us."""
    wait([lifeline])
    os._exit(1)
