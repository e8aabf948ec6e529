"""Reading, checking and applying weight files, with one clear error for every way they go wrong.

Accepted: ``.safetensors``; ``.pth``/``.pt`` holding a bare state dict or a checkpoint dict that
holds one under ``state_dict``/``model``/``model_state_dict`` (a ``module.`` prefix from
DataParallel is stripped). Loading is strict; a mismatch raises ``WeightsError`` naming the file,
the missing and unexpected keys and the shape mismatches. Downloads go to torch's hub cache and are
SHA-256 checked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict", "net", "weights")
_LIST_LIMIT = 8


class WeightsError(ValueError):
    """A weights file is missing, unreadable, of the wrong model, or fails its checksum."""


def _short(items: list[str]) -> str:
    head = ", ".join(items[:_LIST_LIMIT])
    return head + (f", … (+{len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else "")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors in ``path`` as a flat state dict on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path), device="cpu")
        elif suffix in (".pth", ".pt", ".bin", ".ckpt"):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise WeightsError(
                f"{path}: unsupported weights format {suffix!r} (use .safetensors, .pth or .pt)"
            )
    except WeightsError:
        raise
    except Exception as exc:  # corrupt/truncated files surface as many exception types deep in torch
        text = str(exc).strip()
        if "weights_only" in text or "Weights only load failed" in text:
            detail = _restricted(text)
            raise WeightsError(f"{path}: cannot read weights: not a readable checkpoint{detail}") from None
        reason = text.splitlines()[0] if text else type(exc).__name__
        raise WeightsError(f"{path}: cannot read weights (corrupt or truncated file?): {reason}") from None
    return _unwrap(obj, path)


def _restricted(text: str) -> str:
    """What torch's tensors-only unpickler refused (" (Unsupported operand 209)"), or "".

    Its message also advises loading with ``weights_only=False``, which runs whatever code the
    file holds; that advice is not passed on.
    """
    _, found, detail = text.partition("WeightsUnpickler error:")
    detail = " ".join(detail.split()).split(" Check the documentation")[0].split(". ")[0].rstrip(".")
    if not found or not detail or "weights_only" in detail:
        return ""
    return f" ({detail})"


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in CHECKPOINT_KEYS:
            inner = obj.get(key)
            if (
                isinstance(inner, Mapping)
                and inner
                and all(isinstance(v, torch.Tensor) for v in inner.values())
            ):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{path}: no state dict inside (got {type(obj).__name__})")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{path}: no tensors inside; keys: {_short([str(k) for k in obj])}")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def apply_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Strictly load ``state`` into ``module`` or raise one ``WeightsError`` describing every mismatch.

    A file without the auxiliary head (``aux_classifier.*``, training-only) is accepted by dropping
    that head from the module: inference never uses it.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    if (
        missing
        and getattr(module, "aux_classifier", None) is not None
        and all(k.startswith("aux_classifier.") for k in missing)
    ):
        module.aux_classifier = None  # type: ignore[assignment]
        expected = module.state_dict()
        missing = []
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_short(mismatched)}")
    if problems:
        raise WeightsError(f"{source}: weights do not fit the model: " + "; ".join(problems))
    with torch.no_grad():
        module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: str | Path, expected: str) -> None:
    """Check the file's SHA-256; ``expected`` may be the full digest or a prefix (torchvision's
    file names carry the first 8 hex digits)."""
    actual = sha256_of(path)
    if not expected or not actual.startswith(expected.lower()):
        raise WeightsError(f"{path}: checksum mismatch: sha256 {actual} does not match expected {expected}")


def hub_cache_path(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def fetch_cached(url: str, sha256: str, *, allow_download: bool) -> Path:
    """Path of the checksum-verified file for ``url`` in torch's hub cache, downloading if allowed."""
    dst = hub_cache_path(url)
    if not dst.is_file():
        if not allow_download:
            raise WeightsError(
                f"{dst}: not in the cache and downloading is disabled; fetch {url} or pass a weights file"
            )
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(dst), progress=True)
        except Exception as exc:
            raise WeightsError(f"{url}: download failed: {exc}") from None
    try:
        verify_sha256(dst, sha256)
    except WeightsError:
        dst.unlink(missing_ok=True)  # never keep a bad file where the next run would trust it
        raise
    return dst
