"""A study's output directory: created (``--fresh``: emptied first) and bound to the config that
first ran there, so a rerun resumes only the same study."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

__all__ = ["prepare_out_dir"]


def prepare_out_dir(out: Path, resolved: dict[str, Any], *, fresh: bool) -> None:
    """Create ``out`` (delete it first with ``fresh``) and record ``resolved`` (the study's
    config as plain data) in ``out/study_config.json``; ``ValueError`` when ``out`` already
    records a different one."""
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "study_config.json"
    if saved.exists() and json.loads(saved.read_text()) != json.loads(json.dumps(resolved)):
        raise ValueError(f"{out} holds a study run with a different config; pass --fresh to "
                         "start over there, or set study.out_dir to another directory")
    saved.write_text(json.dumps(resolved, indent=2))
