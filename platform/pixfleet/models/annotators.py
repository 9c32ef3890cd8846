"""ControlNet 1.1's annotators through `controlnet_aux`, by the names users know.

Each annotator reads its weights from a folder laid out as the `lllyasviel/Annotators`
repository (the file names controlnet_aux's classes look for) or from that hub id where a hub is
reachable. This module knows each file: the torch module controlnet_aux loads it into and how
the file stores that module's state dict, so that

- a local folder is checked before any work (`folder_problems`, called by the config check): a
  missing file is refused naming the detector, the folder and the files expected, a file that
  does not hold what its module takes naming the file and the missing keys (instead of torch's
  error about a module it never names, from inside an actor); `load_annotator` asks again when
  a load fails (another node's copy of the folder may differ from the one checked);
- `make_random_annotator` writes checkpoints of the real layout with random weights, the
  stand-ins tests and benchmarks load through the same `from_pretrained` a real folder takes.

controlnet_aux and torch are imported where used: only a config naming an annotator's folder
pays for them, and its check reads the files' keys and shapes, not their weights.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ANNOTATORS_REPO = "lllyasviel/Annotators"


@contextlib.contextmanager
def quietly() -> Iterator[None]:
    """controlnet_aux's import re-registers timm models and warns of optional packages
    (mediapipe), timm and torch warn of deprecations, NormalBAE's encoder prints as it is
    built: nothing a user can act on, so none of it reaches their console."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _identity(key: str) -> str:
    return key


def _module_prefix(key: str) -> str:  # saved from nn.DataParallel
    return f"module.{key}"


def _drop_first_part(key: str) -> str:  # openpose's files: keys without the model's first attribute
    return key.split(".", 1)[1]


@dataclass(frozen=True)
class WeightFile:
    """One checkpoint file: its name, the detector's attribute holding the network it loads
    into (a dotted path), that network's module, how the file spells the keys (`file_key` of
    each module key) and whether the state dict sits under a key of its own."""

    name: str
    network: str
    module: Callable[[], Any]
    file_key: Callable[[str], str] = _identity
    wrapper: str | None = None

    def pack(self, state_dict: dict) -> dict:
        """What the real file holds for this state dict."""
        packed = {self.file_key(key): value for key, value in state_dict.items()}
        return {self.wrapper: packed} if self.wrapper else packed

    def problems(self, path: Path) -> str | None:
        """Why the file at `path` is not this checkpoint (None when it is). A zip checkpoint is
        mapped, not read, and the module is built without weights (meta device): the check
        touches keys and shapes only."""
        import zipfile

        import torch

        try:
            content = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as error:
            return f"{path}: not a torch checkpoint ({type(error).__name__}: {str(error).splitlines()[0]})"
        stored = content.get(self.wrapper) if self.wrapper and isinstance(content, dict) else content
        if not isinstance(stored, dict):
            where = f" under {self.wrapper!r}" if self.wrapper else ""
            return f"{path}: holds no state dict{where}"
        with quietly(), torch.device("meta"):
            module = self.module()
        expected = {self.file_key(key): tensor.shape for key, tensor in module.state_dict().items()}
        missing = [key for key in expected if key not in stored]
        wrong = [key for key in expected if key in stored and tuple(stored[key].shape) != tuple(expected[key])]
        if not missing and not wrong:
            return None
        found = [f"missing keys {_few(missing)}"] if missing else []
        found += [f"keys of another shape {_few(wrong)}"] if wrong else []
        return f"{path}: not the checkpoint {ANNOTATORS_REPO} has under this name: {'; '.join(found)}"


def _few(keys: list[str], shown: int = 5) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


@dataclass(frozen=True)
class Annotator:
    """A controlnet_aux detector class (`module:Class`) and the files its from_pretrained reads."""

    detector_class: str
    files: tuple[WeightFile, ...]

    def load(self, model: str) -> Any:
        import importlib

        module, name = self.detector_class.split(":")
        return getattr(importlib.import_module(module), name).from_pretrained(model)


def _lineart() -> Any:
    from controlnet_aux.lineart import Generator

    return Generator(3, 1, 3)


def _lineart_anime() -> Any:
    import functools

    import torch
    from controlnet_aux.lineart_anime import UnetGenerator

    norm = functools.partial(torch.nn.InstanceNorm2d, affine=False, track_running_stats=False)
    return UnetGenerator(3, 1, 8, 64, norm_layer=norm, use_dropout=False)


def _hed() -> Any:
    from controlnet_aux.hed import ControlNetHED_Apache2

    return ControlNetHED_Apache2()


def _pidinet() -> Any:
    from controlnet_aux.pidi.model import pidinet

    return pidinet()


def _mlsd() -> Any:
    from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large

    return MobileV2_MLSD_Large()


def _body() -> Any:
    from controlnet_aux.open_pose.model import bodypose_model

    return bodypose_model()


def _hand() -> Any:
    from controlnet_aux.open_pose.model import handpose_model

    return handpose_model()


def _face() -> Any:
    from controlnet_aux.open_pose.face import FaceNet

    return FaceNet()


def _normal_bae() -> Any:
    import types

    from controlnet_aux.normalbae.nets.NNET import NNET

    # The settings NormalBaeDetector.from_pretrained builds its network with.
    args = types.SimpleNamespace(
        mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4, importance_ratio=0.7
    )
    return NNET(args)


_HED = Annotator("controlnet_aux.hed:HEDdetector", (WeightFile("ControlNetHED.pth", "netNetwork", _hed),))
ANNOTATORS: dict[str, Annotator] = {
    "lineart": Annotator(
        "controlnet_aux.lineart:LineartDetector",
        (WeightFile("sk_model.pth", "model", _lineart), WeightFile("sk_model2.pth", "model_coarse", _lineart)),
    ),
    "lineart_anime": Annotator(
        "controlnet_aux.lineart_anime:LineartAnimeDetector",
        (WeightFile("netG.pth", "model", _lineart_anime, _module_prefix),),
    ),
    "softedge_hed": _HED,
    "scribble_hed": _HED,
    "softedge_pidinet": Annotator(
        "controlnet_aux.pidi:PidiNetDetector",
        (WeightFile("table5_pidinet.pth", "netNetwork", _pidinet, _module_prefix, wrapper="state_dict"),),
    ),
    "mlsd": Annotator("controlnet_aux.mlsd:MLSDdetector", (WeightFile("mlsd_large_512_fp32.pth", "model", _mlsd),)),
    "openpose": Annotator(
        "controlnet_aux.open_pose:OpenposeDetector",
        (
            WeightFile("body_pose_model.pth", "body_estimation.model", _body, _drop_first_part),
            WeightFile("hand_pose_model.pth", "hand_estimation.model", _hand, _drop_first_part),
            WeightFile("facenet.pth", "face_estimation.model", _face),
        ),
    ),
    "normal_bae": Annotator(
        "controlnet_aux.normalbae:NormalBaeDetector",
        (WeightFile("scannet.pt", "model", _normal_bae, wrapper="model"),),
    ),
}


def folder_problems(detector: str, model: str) -> str | None:
    """Why the local folder `model` cannot serve `detector`: files missing, or a file that does
    not hold its module's weights (None if it can, or if `model` is a hub id, whose files are
    fetched when the annotator loads)."""
    folder = Path(os.path.expanduser(model))
    if not folder.is_dir():
        return None
    files = ANNOTATORS[detector].files
    expected = [file.name for file in files]
    missing = [name for name in expected if not (folder / name).is_file()]
    if missing:
        return (
            f"detector {detector!r}: {folder} lacks {', '.join(missing)} (it reads {', '.join(expected)}, "
            f"laid out as the {ANNOTATORS_REPO} repository)"
        )
    problems = [problem for file in files if (problem := file.problems(folder / file.name))]
    return f"detector {detector!r}: " + "; ".join(problems) if problems else None


def load_annotator(detector: str, model: str) -> Any:
    """controlnet_aux's detector for `detector`, its weights from the folder or hub id `model`."""
    annotator = ANNOTATORS[detector]
    try:
        with quietly():
            return annotator.load(model)
    except Exception as error:
        if problem := folder_problems(detector, model):
            raise ValueError(problem) from error
        raise


def make_random_annotator(detector: str, out_dir: str | Path, seed: int = 0) -> Path:
    """`detector`'s checkpoint files with random weights, as the real ones are laid out."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for file in ANNOTATORS[detector].files:
        torch.manual_seed(seed)
        with quietly():
            module = file.module()
        torch.save(file.pack(module.state_dict()), out / file.name)
    return out
