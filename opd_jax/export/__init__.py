"""Take a trained student out of a run directory: a Hugging Face folder, PEFT adapters or a GGUF.

    opd-jax export runs/demo --to hf exported/demo-student          # merged HF folder
    opd-jax export runs/demo --stage opd --step 40 --to hf out/     # a given checkpoint
    opd-jax export runs/demo --to hf out/ --lora-only                # PEFT adapters (+ base)
    opd-jax export runs/demo --to gguf out/student.gguf [--gguf-type q8_0]

>>> from opd_jax.export import export_run                      # doctest: +SKIP
>>> export_run("runs/demo", "exported/demo-student", to="hf")   # doctest: +SKIP

Everything that can be refused is refused before a weight is read (:func:`export_run`), and the
output is written to a temporary sibling that is renamed into place only once complete, so a failed
export never leaves a half-written folder or touches an existing one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from opd_jax.export.run_source import ExportSource, RunLockedError, load_student, locate

__all__ = ["export_run", "ExportSource", "RunLockedError", "locate", "load_student", "TARGETS"]

TARGETS = ("hf", "gguf")


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, *, to: str = "hf",
               stage: str | None = None, step: int | None = None, lora_only: bool = False,
               force: bool = False, dtype: str | None = None, gguf_type: str = "f16",
               max_shard_bytes: int = 2 * 1024**3) -> dict:
    """Export the student of ``run_dir`` (``stage``/``step``: default the last saved) to ``out``.

    Args:
      to: ``"hf"`` (a folder: merged weights, or PEFT adapters with ``lora_only``) or ``"gguf"``
        (a single ``.gguf`` file, ``gguf_type`` ``f16`` / ``q8_0`` / ``f32``).
      force: replace an existing ``out`` (after the new one is complete).
      dtype: HF weights' dtype (default: the student's training dtype).
    Returns a summary: source stage/step, whether the stage finished, files written.
    """
    if to not in TARGETS:
        raise ValueError(f"--to {to!r} is not one of {list(TARGETS)}")
    if lora_only and to != "hf":
        raise ValueError("--lora-only writes PEFT adapters, a Hugging Face format: use --to hf")
    out = Path(out).expanduser().absolute()
    source = locate(run_dir, stage, step)
    _check_out(out, source.run_dir.absolute(), force)
    if lora_only and not source.cfg.student.lora.enabled:
        raise ValueError(f"{source.run_dir} trained the full student (student.lora.rank=0): "
                         "there are no adapters; drop --lora-only to export the whole model")
    if to == "gguf":
        from opd_jax.export.gguf_file import GGUF_TYPES

        if gguf_type not in GGUF_TYPES:
            raise ValueError(f"--gguf-type {gguf_type!r} is not one of {sorted(GGUF_TYPES)}")
    dtype = dtype or source.cfg.student.dtype
    summary = {"run_dir": str(source.run_dir), "stage": source.stage, "step": source.step,
               "stage_done": source.done, "to": to, "out": str(out)}
    model, adapters = load_student(source, merge=not lora_only)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if to == "gguf":
            from opd_jax.export.gguf_file import write_gguf

            target = tmp / out.name
            summary.update(write_gguf(target, model, gguf_type=gguf_type))
            _replace(target, out)
        else:
            from opd_jax.export.hf_folder import write_hf_folder, write_peft_adapter

            meta = {"opd_jax_run": str(source.run_dir), "opd_jax_stage": source.stage,
                    "opd_jax_step": str(source.step)}
            if lora_only:
                spec = source.cfg.student
                base = _plain_hf_source(spec)
                if base is None:   # a derived / GGUF / random base: ship it beside the adapters
                    (tmp / "base").mkdir()
                    write_hf_folder(tmp / "base", model, dtype=dtype,
                                    max_shard_bytes=max_shard_bytes)
                    base = str(out / "base")
                summary.update(write_peft_adapter(tmp, model.config, adapters,
                                                  alpha=spec.lora.alpha, base_model=base,
                                                  dtype=dtype))
                summary["base_model"] = base
            else:
                summary.update(write_hf_folder(tmp, model, dtype=dtype,
                                               max_shard_bytes=max_shard_bytes, metadata=meta))
            _replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _plain_hf_source(spec) -> str | None:
    """The student's source folder when it is an underived Hugging Face folder (the PEFT base)."""
    if spec.source in ("default", "random") or spec.derive is not None:
        return None
    path = Path(spec.source).expanduser()
    return str(path.absolute()) if (path / "config.json").is_file() else None


def _check_out(out: Path, run_dir: Path, force: bool) -> None:
    if out == run_dir or run_dir.is_relative_to(out) or out.is_relative_to(run_dir):
        raise ValueError(f"the output {out} overlaps the run directory {run_dir}; export "
                         "somewhere outside it")
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; choose another path or pass --force to "
                              "replace it (the old one is removed only after the export succeeds)")
    if out.exists() and out.is_dir() and (out / "checkpoints").is_dir():
        raise ValueError(f"{out} looks like a run directory (it has checkpoints/); --force will "
                         "not replace it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the parent folder of {out} does not exist; create it first")


def _replace(new: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(new, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
