"""What a model is, independent of where it lies: a hash of a local folder's files, or the hub
id and revision.

Row ids and the `Model hash` of the A1111 text use these, so moving or copying a model folder
changes neither, and two folders with other weights never share one. A folder of a diffusers
pipeline is hashed over `model_index.json` and the component folders it names; any other
folder (a ControlNet, a LoRA) over all its files. File hashes are cached by path, size and
modification time, so only the first job over a large model pays for reading it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pixfleet.config.model import ModelSpec
from pixfleet.config.paths import looks_local

CACHE_FILE = Path.home() / ".cache" / "pixfleet" / "file_hashes.json"
_CHUNK = 16 * 2**20


def model_hash(model: str, revision: str | None = None) -> str:
    """The sha256 (hex) identifying `model`: a local file or folder by content, a hub id by name and revision."""
    if not looks_local(model):
        return hashlib.sha256(f"hub:{model}@{revision or 'main'}".encode()).hexdigest()
    root = Path(model).expanduser()
    files = [root] if root.is_file() else _model_files(root)
    cache = _FileHashCache()
    digest = hashlib.sha256()
    for path in files:
        relative = path.name if path == root else path.relative_to(root).as_posix()
        digest.update(f"{relative}\0{cache.sha256(path)}\n".encode())
    cache.save()
    return digest.hexdigest()


def short_hash(sha256: str) -> str:
    """The 10 hex digits A1111 shows as `Model hash`."""
    return sha256[:10]


def _model_files(root: Path) -> list[Path]:
    index = root / "model_index.json"
    if index.is_file():
        components = [name for name in json.loads(index.read_text()) if not name.startswith("_")]
        folders = [root / name for name in components if (root / name).is_dir()]
        files = [index, *(p for folder in folders for p in folder.rglob("*"))]
    else:
        files = list(root.rglob("*"))
    return sorted(p for p in files if p.is_file() and not any(part.startswith(".") for part in p.parts[-2:]))


class _FileHashCache:
    """sha256 of files, remembered by (path, size, mtime) in one JSON file per user."""

    def __init__(self):
        try:
            self.entries = json.loads(CACHE_FILE.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.changed = False

    def sha256(self, path: Path) -> str:
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in self.entries:
            digest = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
            self.entries[key] = digest.hexdigest()
            self.changed = True
        return self.entries[key]

    def save(self) -> None:
        """Write atomically; concurrent writers may drop each other's entries, never corrupt the file."""
        if not self.changed:
            return
        with contextlib.suppress(OSError):
            CACHE_FILE.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=CACHE_FILE.parent, prefix=".file_hashes.")
            with os.fdopen(fd, "w") as f:
                json.dump(self.entries, f)
            os.replace(tmp, CACHE_FILE)


@dataclass(frozen=True)
class ModelIdentity:
    """A pipeline as configured (names as the user wrote them) and as it is (content hashes)."""

    task: str
    base_model: str
    base_model_hash: str
    controlnets: tuple[str, ...]
    controlnet_hashes: tuple[str, ...]
    # Everything else that changes images: scheduler, dtype, variant, adapters (hashed), FreeU.
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, spec: ModelSpec, named: ModelSpec | None = None) -> ModelIdentity:
        """Hash `spec`'s local folders; `named` is the same spec as written (`models:/` URIs)
        when `spec` has them resolved to downloaded folders."""
        named = named or spec
        adapters = {
            "loras": [
                {"hash": model_hash(lora.path), "weight_name": lora.weight_name, "scale": lora.scale}
                for lora in spec.loras
            ],
            "textual_inversions": [{"hash": model_hash(t.path), "token": t.token} for t in spec.textual_inversions],
        }
        freeu = spec.optimizations.freeu
        return cls(
            task=spec.task,
            base_model=named.base_model,
            base_model_hash=model_hash(spec.base_model, spec.revision),
            controlnets=tuple(named.controlnets),
            controlnet_hashes=tuple(model_hash(c, spec.revision) for c in spec.controlnets),
            settings={
                **spec.model_dump(include={"scheduler", "dtype", "variant"}),
                **adapters,
                "freeu": freeu.model_dump() if freeu else None,
            },
        )

    def fingerprint(self) -> dict[str, Any]:
        """What decides the images, without names or paths."""
        return {
            "task": self.task,
            "base_model": self.base_model_hash,
            "controlnets": list(self.controlnet_hashes),
            **self.settings,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "controlnets": list(self.controlnets),
            "controlnet_hashes": list(self.controlnet_hashes),
        }
