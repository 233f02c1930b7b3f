"""Run a function in a fresh worker process, so that a framework's crash is an error, not a dead run.

:func:`run_isolated` calls a picklable module-level function in a new process
(multiprocessing's ``spawn`` start method: no state inherited from the parent,
whatever frameworks it has loaded) and returns its result. What can go wrong
comes back as a hal exception:

* the function raises a :class:`~hal.errors.HalError`: the same class is raised
  here, message and attributes intact;
* it raises anything else: a :class:`~hal.errors.HalError` naming the exception
  type and message;
* the process dies (segfault, abort, out-of-memory kill, ``os._exit``): a
  :class:`~hal.errors.WorkerError` naming the signal or exit status, with the tail
  of the worker's stderr (Python's faulthandler writes the crashing stack there).

Either way the worker's traceback text is on the exception as ``worker_traceback``
(for debugging; users see the message). Backends registered by hand
(:func:`hal.registry.register_backend`) are registered in the worker too. The
worker ignores Ctrl-C and dies with its parent; an interrupted parent terminates it.

:func:`run_inline` has the same contract in the current process, for callers
that choose not to pay for a process start.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import pickle
import signal
import sys
import tempfile
import threading
import traceback
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, TypeVar

from hal.errors import HalError, WorkerError

T = TypeVar("T")
STDERR_TAIL = 2000  # characters of a dead worker's stderr quoted in the error
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
    """``fn(*args, **kwargs)`` in a fresh ``spawn`` process; see the module docstring.

    ``fn``, its arguments and its result must pickle (``fn`` defined at module
    level). ``label`` names the work in error messages (e.g. the target). With
    ``progress``, ``fn`` is also passed ``progress=``: a callable that relays each
    message to ``progress`` in this process.
    """
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    fd, err_path = tempfile.mkstemp(prefix="hal-worker-", suffix=".stderr")
    os.close(fd)
    try:
        proc = ctx.Process(
            target=_child,
            args=(send, err_path, _portable_registry(), fn, args, kwargs, progress is not None),
            name=f"hal-worker {label}".strip(),
            daemon=True,
        )
        try:
            proc.start()
        except Exception as exc:  # e.g. an argument that does not pickle
            raise WorkerError(_prefix(label, f"could not start a worker process: {describe(exc)}")) from exc
        finally:
            send.close()
        try:
            message = _wait(proc, receive, progress)
            proc.join(_EXIT_GRACE_S)
        finally:  # also on KeyboardInterrupt: no worker outlives the call
            receive.close()
            _stop(proc)
        with open(err_path, "rb") as f:
            stderr = f.read().decode(errors="replace")
    finally:
        os.unlink(err_path)
    if message is None:
        tail = stderr[-STDERR_TAIL:].strip()
        raise WorkerError(_prefix(label, f"the worker process died ({_exit_reason(proc.exitcode)})")
                          + (f"; its stderr ends with:\n{tail}" if tail else ""))
    if stderr:  # warnings and logs of a worker that ended normally are not lost
        sys.stderr.write(stderr)
    kind, payload = message
    if kind == "ok":
        return payload
    blob, text, tb = payload
    err = _unpickle_error(blob) or HalError(_prefix(label, text))
    err.worker_traceback = tb  # type: ignore[attr-defined]
    raise err


def _prefix(label: str, text: str) -> str:
    return f"{label}: {text}" if label else text


def _portable_registry() -> dict[str, type]:
    """The hand-registered backends whose classes pickle (by reference: importable by name)."""
    from hal.registry import _registered

    out = {}
    for name, cls in _registered.items():
        try:
            pickle.dumps(cls)
        except Exception:  # a class defined inside a function cannot reach a worker
            continue
        out[name] = cls
    return out


def _wait(proc: Any, receive: Connection, progress: Progress | None) -> tuple[str, Any] | None:
    """The worker's final message, relaying progress; None if it died without one."""
    while True:
        wait([receive, proc.sentinel])
        try:
            while receive.poll():
                kind, payload = receive.recv()
                if kind != "progress":
                    return kind, payload
                if progress is not None:
                    progress(payload)
        except (EOFError, OSError):  # the worker is gone and its end of the pipe closed
            return None


def _stop(proc: Any) -> None:
    """Terminate (then kill) a worker that is still running."""
    if proc.is_alive():
        proc.terminate()
        proc.join(_EXIT_GRACE_S)
    if proc.is_alive():
        proc.kill()
        proc.join()


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = ", e.g. by the out-of-memory killer" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit status {code}"


def _unpickle_error(blob: bytes | None) -> HalError | None:
    """The worker's HalError, rebuilt as (class, args, attributes) without calling its
    ``__init__`` (``NonFiniteError(message, step)`` takes other arguments than its args)."""
    if blob is None:
        return None
    try:
        cls, args, state = pickle.loads(blob)
    except Exception:  # its class cannot be imported here: the message will do
        return None
    exc = cls.__new__(cls, *args)
    exc.args = args
    vars(exc).update(state)
    return exc


def _child(
    send: Connection, stderr_path: str, registered: dict[str, type], fn: Callable[..., Any], args: tuple,
    kwargs: dict[str, Any], relay: bool,
) -> None:
    """The worker's entry point: call ``fn`` and send ``("ok", result)`` or ``("error", ...)``."""
    err_fd = os.open(stderr_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(err_fd, 2)
    os.close(err_fd)
    faulthandler.enable()  # a crash writes the Python stack to stderr, whose tail the parent quotes
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when the worker stops
    _exit_with_parent()
    from hal.registry import _registered

    _registered.update(registered)
    if relay:
        kwargs["progress"] = lambda message: send.send(("progress", str(message)))
    try:
        send.send(("ok", fn(*args, **kwargs)))
    except Exception as exc:
        blob = None
        if isinstance(exc, HalError):
            try:
                blob = pickle.dumps((type(exc), exc.args, dict(vars(exc))))
            except Exception:  # an attribute that does not pickle: the message will do
                pass
        send.send(("error", (blob, describe(exc), traceback.format_exc())))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip framework teardown at interpreter exit: slow, and it can crash after the work is done


def _exit_with_parent() -> None:
    """Exit when the parent process goes away (killed, crashed), so no worker is orphaned."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="hal-worker-watchdog", daemon=True).start()
