"""Save a :class:`~torchgmm.GaussianMixture` to one file and load it back.

The file is one ``torch.save`` of a dict holding only tensors, dicts, lists, tuples, str, int,
float, bool and None, so ``torch.load(path, weights_only=True)`` reads it (no code runs at load)::

    {
        "format": "torchgmm.GaussianMixture",
        "format_version": 1,
        "torchgmm_version": "0.1.0",
        "settings": {...},        # every constructor setting, by name
        "parameters": {...},      # weight_logits (*B, K), loc (*B, K, D), prec_chol_raw
        "buffers": {...},         # the fitted state: converged_, n_iter_, lower_bound_, ...
    }

Parameters and buffers are saved as they are (unconstrained form, their dtype), so a loaded model
predicts bit for bit as the saved one. Every buffer named in ``mixture._BUFFERS`` that is set is
saved and restored. Settings that are not plain values are encoded: a ``torch.dtype`` or
``torch.device`` by name, a numpy array as a tensor (restored as a numpy array), a prior given as
a ``ConjugatePrior`` by its fields; a ``torch.Generator`` ``random_state`` is saved as None (its
state is not a setting). The fit record ``result_`` is not saved.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import mixture
from .mixture import _PARAMETERS, GaussianMixture
from .prior import ConjugatePrior

__all__ = ["save", "load", "FORMAT", "FORMAT_VERSION"]

FORMAT = "torchgmm.GaussianMixture"
FORMAT_VERSION = 1


def _version() -> str:
    from . import __version__  # the package's, read when used (this module is imported by it)

    return __version__

# Tags of encoded settings: {tag: value}.
_DTYPE, _DEVICE, _NDARRAY, _PRIOR = "__torch_dtype__", "__torch_device__", "__ndarray__", "__conjugate_prior__"


def _encode(value: Any, name: str) -> Any:
    """A setting as plain data that ``torch.load(weights_only=True)`` reads."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Generator):
        return None
    if isinstance(value, torch.dtype):
        return {_DTYPE: str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {_DEVICE: str(value)}
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, np.ndarray):
        return {_NDARRAY: torch.from_numpy(np.array(value))}
    if isinstance(value, ConjugatePrior):
        return {_PRIOR: {field: t.detach().clone() for field, t in value._asdict().items()}}
    if isinstance(value, dict):
        return {str(key): _encode(item, f"{name}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_encode(item, f"{name}[{i}]") for i, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(
        f"cannot save the setting {name}={value!r} of type {type(value).__name__}: settings are saved as "
        "plain values (numbers, strings, arrays, dicts); set it to one of those before saving"
    )


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if len(value) == 1:
            (tag, item), = value.items()
            if tag == _DTYPE:
                return getattr(torch, item)
            if tag == _DEVICE:
                return torch.device(item)
            if tag == _NDARRAY:
                return item.cpu().numpy()
            if tag == _PRIOR:
                return ConjugatePrior(**item)
        return {key: _decode(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_decode(item) for item in value)
    return value


def save(model: GaussianMixture, path) -> None:
    """Write ``model`` (settings, parameters and fitted state) to ``path`` (a file name or a
    writable binary file object). Fitted or not; ``load(path)`` restores it."""
    from .hmm import GaussianHMM

    if isinstance(model, GaussianHMM):
        return _save_hmm(model, path)
    if not isinstance(model, GaussianMixture):
        raise TypeError(f"model must be a torchgmm.GaussianMixture, got {type(model).__name__}")
    settings = {name: _encode(value, name) for name, value in model._settings().items()}
    parameters = {name: getattr(model, name).detach() for name in _PARAMETERS if getattr(model, name) is not None}
    buffers = {name: getattr(model, name).detach() for name in mixture._BUFFERS if getattr(model, name, None) is not None}
    torch.save(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "torchgmm_version": _version(),
            "settings": settings,
            "parameters": parameters,
            "buffers": buffers,
        },
        path,
    )


def _not_a_model(path, why: str) -> ValueError:
    return ValueError(
        f"{path!r} is not a torchgmm model file ({why}); load files written by GaussianMixture.save(path) "
        "or torchgmm.serialization.save(model, path)"
    )


def load(path, device=None) -> GaussianMixture:
    """The :class:`~torchgmm.GaussianMixture` (or :class:`~torchgmm.GaussianHMM`) saved in ``path``,
    with its settings, parameters and fitted state.

    Its tensors are loaded onto ``device`` (default: the CPU, whatever device the model was
    fitted on; ``torch.load``'s ``map_location``). When ``device`` is given it also replaces the
    ``device`` setting, so a later ``fit`` runs there. The file is read with
    ``weights_only=True``: no code in it runs.
    """
    map_location = torch.device("cpu") if device is None else torch.device(device)
    try:
        saved = torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as err:  # not a torch file, or one holding arbitrary objects
        raise _not_a_model(path, f"torch.load(weights_only=True) failed: {type(err).__name__}: {str(err)[:200]}") from err
    if isinstance(saved, dict) and saved.get("format") == HMM_FORMAT:
        return _load_hmm(saved, path, device)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        what = f"a dict with keys {sorted(map(str, saved))[:8]}" if isinstance(saved, dict) else f"a {type(saved).__name__}"
        raise _not_a_model(path, f"it holds {what}, without format={FORMAT!r}")
    _check_layout(saved, path)

    known = set(GaussianMixture()._settings())
    settings = {name: _decode(value) for name, value in saved["settings"].items() if name in known}
    if device is not None:
        settings["device"] = device
    n_features = settings.pop("n_features", None)  # the saved parameters replace a standard start
    model = GaussianMixture(**settings)
    model.n_features = n_features
    state = {name: t for name, t in saved["parameters"].items() if name in _PARAMETERS}
    state.update((name, t) for name, t in saved["buffers"].items() if name in mixture._BUFFERS)
    for name, t in state.items():
        if not isinstance(t, Tensor):
            raise _not_a_model(path, f"its entry {name!r} is a {type(t).__name__}, not a tensor")
    if state and not all(name in state for name in _PARAMETERS):
        raise _not_a_model(path, f"it holds {sorted(state)} but not all of the parameters {list(_PARAMETERS)}")
    model.load_state_dict(state, strict=False)  # creates the tensors with the saved shapes, checks them
    return model


# -- GaussianHMM: the same file layout, its own format name -------------------------------------------
HMM_FORMAT = "torchgmm.GaussianHMM"


def _save_hmm(model, path) -> None:
    """:func:`save` for a :class:`~torchgmm.GaussianHMM` (format ``HMM_FORMAT``, same layout)."""
    from . import hmm

    settings = {name: _encode(value, name) for name, value in model._settings().items()}
    parameters = {name: getattr(model, name).detach() for name in hmm._PARAMETERS if getattr(model, name) is not None}
    buffers = {name: getattr(model, name).detach() for name in hmm._BUFFERS if getattr(model, name, None) is not None}
    torch.save({"format": HMM_FORMAT, "format_version": FORMAT_VERSION, "torchgmm_version": _version(),
                "settings": settings, "parameters": parameters, "buffers": buffers}, path)


def _check_layout(saved: dict, path) -> None:
    """The format version is one this torchgmm reads, and the three sections are there."""
    version = saved.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path!r} was written in torchgmm model format version {version!r} (torchgmm "
            f"{saved.get('torchgmm_version')}); this torchgmm ({_version()}) reads versions up to "
            f"{FORMAT_VERSION}: upgrade torchgmm"
        )
    for key in ("settings", "parameters", "buffers"):
        if not isinstance(saved.get(key), dict):
            raise _not_a_model(path, f"its {key!r} entry is missing or not a dict")


def _load_hmm(saved: dict, path, device=None):
    """:func:`load` of a file ``_save_hmm`` wrote (already read with ``weights_only=True``)."""
    from . import hmm

    _check_layout(saved, path)
    known = set(hmm.GaussianHMM()._settings())
    settings = {name: _decode(value) for name, value in saved["settings"].items() if name in known}
    if device is not None:
        settings["device"] = device
    model = hmm.GaussianHMM(**settings)
    state = {name: t for name, t in saved["parameters"].items() if name in hmm._PARAMETERS}
    state.update((name, t) for name, t in saved["buffers"].items() if name in hmm._BUFFERS)
    for name, t in state.items():
        if not isinstance(t, Tensor):
            raise _not_a_model(path, f"its entry {name!r} is a {type(t).__name__}, not a tensor")
    if state and not all(name in state for name in hmm._PARAMETERS):
        raise _not_a_model(path, f"it holds {sorted(state)} but not all of the parameters {list(hmm._PARAMETERS)}")
    model.load_state_dict(state, strict=False)
    return model
