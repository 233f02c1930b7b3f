"""What the speed scripts in bench/ share: the closing Markdown table, the load average, and the atomic write
of their JSON record."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from hal.weights import atomic_write


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
