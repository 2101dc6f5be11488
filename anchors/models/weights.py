"""Reading model weights without unpickling untrusted code.

Three formats are accepted: safetensors; a ``torch.save`` state dict (read with
``weights_only=True``); and a TorchScript archive such as OpenAI's original CLIP checkpoints,
whose pickled module tree is read by a restricted unpickler that admits only tensor
reconstruction and stands in an inert placeholder for every TorchScript class - nothing in the
file is ever executed.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile

import torch

from anchorscan.anchors.errors import UserError

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class WeightsError(UserError, ValueError):
    """The weights file cannot be read in any of the accepted formats."""


class _ScriptObject:
    """Stands in for a TorchScript class: keeps its attributes, runs nothing."""

    def __setstate__(self, state):
        self.attributes = state if isinstance(state, dict) else {}


def _rebuild_tensor(flat: torch.Tensor, offset: int, size, stride, *_unused) -> torch.Tensor:
    return torch.as_strided(flat, tuple(size), tuple(stride), offset).clone()


class _ArchiveUnpickler(pickle.Unpickler):
    """Hand-written: ``torch.load(weights_only=True)`` refuses TorchScript archives, and
    ``torch.jit.load`` would run their code."""

    def __init__(self, archive: zipfile.ZipFile, root: str, data: bytes):
        super().__init__(io.BytesIO(data))
        self.archive, self.root = archive, root

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__."):
            return _ScriptObject
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights file")

    def persistent_load(self, persistent_id):
        _, dtype, key, _location, numel = persistent_id
        data = self.archive.read(f"{self.root}/data/{key}")
        return (
            torch.frombuffer(bytearray(data), dtype=dtype)[:numel] if numel else torch.empty(0, dtype=dtype)
        )


def _collect(obj, prefix: str, out: dict) -> None:
    for name, value in obj.attributes.items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            _collect(value, f"{prefix}{name}.", out)


def read_torchscript_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor attribute of a TorchScript archive's module tree, by dotted name."""
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise WeightsError(f"{path} is not a TorchScript archive")
        root = pickles[0][: -len("/data.pkl")]
        module = _ArchiveUnpickler(archive, root, archive.read(pickles[0])).load()
    if not isinstance(module, _ScriptObject):
        raise WeightsError(f"{path}: the archive's root is not a module")
    tensors: dict[str, torch.Tensor] = {}
    _collect(module, "", tensors)
    return tensors


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors by name from safetensors, a weights-only torch checkpoint or a TorchScript archive."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    if _is_torchscript(path):
        return read_torchscript_tensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise WeightsError(f"{path} holds more than tensors and is refused: {error}") from None
    except Exception as error:
        raise WeightsError(f"cannot read weights from {path}: {error}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict")
    return {key.removeprefix("module."): value for key, value in state.items()}
