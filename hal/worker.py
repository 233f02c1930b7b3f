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
from typing import Any, Callable, TypeVar

from hal.errors import HalError, WorkerError

T = TypeVar("T")
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
        request = pickle.dumps((_portable_registry(), fn, args, kwargs, progress is not None), pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise WorkerError(_prefix(label, f"could not start a worker process: {describe(exc)}")) from exc
    req_r, req_w = os.pipe()  # request; the worker exits when this closes (parent done or dead)
    res_r, res_w = os.pipe()  # progress messages and the result
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))  # import what the parent imports
    with tempfile.TemporaryFile(prefix="hal-worker-", suffix=".stderr") as err_file:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-X", "faulthandler", "-c", f"from hal.worker import _serve; _serve({req_r}, {res_w})"],
                stdin=subprocess.DEVNULL, stderr=err_file, pass_fds=(req_r, res_w), env=env,
            )
        except OSError as exc:
            for fd in (req_r, req_w, res_r, res_w):
                os.close(fd)
            raise WorkerError(_prefix(label, f"could not start a worker process: {exc}")) from exc
        os.close(req_r)
        os.close(res_w)
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
        summary = _crash_summary(stderr)
        err = WorkerError(_prefix(label, f"the worker process died ({_exit_reason(proc.returncode)})")
                          + (f": {summary}" if summary else ""))
        err.worker_stderr = stderr[-STDERR_TAIL:]  # type: ignore[attr-defined]
        raise err
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


def _serve(req_fd: int, res_fd: int) -> None:
    """The worker's entry point: read the request, call ``fn``, send ``("ok", result)`` or
    ``("error", ...)``, and exit without the interpreter's teardown."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when the worker stops
    requests, send = Connection(req_fd, writable=False), Connection(res_fd, readable=False)
    registered, fn, args, kwargs, relay = pickle.loads(requests.recv_bytes())
    threading.Thread(target=_exit_with_parent, args=(requests,), name="hal-worker-watchdog", daemon=True).start()
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


def _exit_with_parent(requests: Connection) -> None:
    """Exit when the parent closes the request pipe: it is gone (killed, crashed) or done with us."""
    wait([requests])
    os._exit(1)
