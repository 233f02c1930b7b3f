"""What the speed scripts in bench/ share: the closing Markdown table, the load average, the atomic write
of their JSON record, and another version of the jax backend for an A/B in one process."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from hal.weights import atomic_write


def jax_module_executable(name: str, path: str, spec: Any, weights: Any, config: Any) -> Any:
    """A jax:cpu executable built by the backend module file ``path`` (e.g. ``git show HEAD~1:backends/jax.py``),
    imported as ``hal.backends._jax_<name>`` next to the installed one."""
    import importlib.util
    import sys

    module_name = f"hal.backends._jax_{name}"
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(module_name, path))
    sys.modules[module_name] = module
    module.__spec__.loader.exec_module(module)
    return module.JaxExecutable(spec, weights, "cpu", config, "highest")


def report(result: dict[str, Any], header: Sequence[str], rows: Sequence[Sequence[str]], load_start: Sequence[float],
           out: Path | None) -> dict[str, Any]:
    """Print ``rows`` as a Markdown table under ``header`` and the load average since ``load_start``; write
    ``result`` as JSON to ``out`` (atomically) when given; return ``result``."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"load average {load_start[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, (json.dumps(result, indent=1) + "\n").encode())
    return result
