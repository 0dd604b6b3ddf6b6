"""The organism's shipped weights: only what training changed, rebuilt on the preset's seeded init.

`organism.safetensors` holds every tensor that differs from the `tiny` preset built from seed 0,
except the thinker's two 151,936-row tables (embedding and head), of which it holds only the rows
of the world's vocabulary (with their ids); every other row is the seeded init, exactly as it was
during training. The file's metadata names its format and the preset and seed it builds on.

The rebuild is checked: the file records a sha256 of the whole rebuilt model's state (every
tensor's name, dtype, shape and bytes) and the torch and transformers versions that made it.
Loading rebuilds the preset, puts the tensors in place, hashes the result and refuses, naming both
versions, when another torch or transformers would build a different model from the same seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from importlib import resources
from pathlib import Path

import torch

from ..errors import ModelLoadError

FORMAT = "omnilab-organism/1"
PRESET, SEED = "tiny", 0
FILE = "organism.safetensors"
ROWS_KEY = "vocabulary_ids"

log = logging.getLogger(__name__)


def model_digest(model: torch.nn.Module) -> str:
    """A sha256 of `model`'s whole state: every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        value = value.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _versions() -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def shipped_path() -> Path:
    """Where the package keeps the organism's weights."""
    return Path(str(resources.files("omnilab.organism").joinpath(f"weights/{FILE}")))


def pack(
    model: torch.nn.Module, path: str | Path, *, vocabulary: torch.Tensor, meta: dict | None = None
) -> dict:
    """Write `model`'s difference from the seeded preset to `path`; returns {what: count} of what it wrote."""
    from safetensors.torch import save_file

    from ..models.presets import build_preset

    base = build_preset(PRESET, seed=SEED).state_dict()
    state = model.state_dict()
    tables = row_tables(model)
    tensors: dict[str, torch.Tensor] = {ROWS_KEY: vocabulary.to(torch.int64).contiguous()}
    for name, value in state.items():
        if name in tables:
            rows = value[vocabulary]
            if not torch.equal(value.index_fill(0, vocabulary, 0), base[name].index_fill(0, vocabulary, 0)):
                raise ValueError(f"{name} changed outside the vocabulary rows; it cannot be shipped as rows")
            tensors[f"{name}@rows"] = rows.contiguous()
        elif not torch.equal(value, base[name]):
            tensors[name] = value.contiguous()
    metadata = {
        "format": FORMAT,
        "preset": PRESET,
        "seed": str(SEED),
        "sha256": _digest(tensors),
        "model_sha256": model_digest(model),
        "built_with": json.dumps(_versions()),
        "meta": json.dumps(meta or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return {"tensors": len(tensors), "values": sum(t.numel() for t in tensors.values())}


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def row_tables(model: torch.nn.Module) -> set[str]:
    """The state-dict names of the thinker's embedding and head: the tables shipped as rows."""
    wanted = (model.thinker.get_input_embeddings().weight, model.thinker.lm_head.weight)
    return {name for name, p in model.named_parameters() if any(p is w for w in wanted)}


def unpack(path: str | Path | None = None) -> tuple[torch.nn.Module, dict]:
    """The organism: the seeded preset with the file's tensors put in place; (model, its meta)."""
    from safetensors import SafetensorError, safe_open

    from ..models.presets import build_preset

    path = Path(path) if path is not None else shipped_path()
    if not path.is_file():
        raise ModelLoadError(
            f"the organism's weights '{path}' are missing; reinstall omnilab, or train them with "
            "`omnilab train organism`"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ModelLoadError(
                    f"'{path}' is not an organism weights file (format {metadata.get('format')!r}, "
                    f"expected {FORMAT!r}); reinstall omnilab or retrain with `omnilab train organism`"
                )
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ModelLoadError(
            f"the organism's weights '{path}' cannot be read ({error}); the file is corrupt or cut "
            "short; reinstall omnilab (or `git checkout` the file), or retrain with `omnilab train organism`"
        ) from None
    if _digest(tensors) != metadata.get("sha256"):
        raise ModelLoadError(
            f"the organism's weights '{path}' are corrupt: their checksum does not match the one "
            "recorded in the file; reinstall omnilab (or `git checkout` the file), or retrain with "
            "`omnilab train organism`"
        )
    model = build_preset(metadata.get("preset", PRESET), seed=int(metadata.get("seed", SEED)))
    state = model.state_dict()
    vocabulary = tensors.pop(ROWS_KEY, None)
    with torch.no_grad():
        for key, value in tensors.items():
            name, _, rows = key.partition("@")
            target = state.get(name)
            shape = (
                (len(vocabulary), *target.shape[1:])
                if rows and target is not None and vocabulary is not None
                else None
            )
            if target is None or tuple(value.shape) != tuple(shape or target.shape):
                raise ModelLoadError(
                    f"the organism's weights '{path}' do not fit this model (tensor {name!r}); they were "
                    "made by another omnilab or transformers version; retrain with `omnilab train organism`"
                )
            if rows:
                target[vocabulary] = value.to(target.dtype)
            else:
                target.copy_(value)
    _check_rebuild(model, metadata, path)
    return model.eval(), json.loads(metadata.get("meta", "{}"))


def _check_rebuild(model: torch.nn.Module, metadata: dict, path: Path) -> None:
    """Refuse a rebuilt model whose state differs from the one the weights were packed from."""
    expected = metadata.get("model_sha256")
    if expected is None:  # files packed before the check existed
        log.warning("the organism's weights '%s' carry no hash of the rebuilt model; not checked", path)
        return
    if model_digest(model) == expected:
        return
    made = json.loads(metadata.get("built_with", "{}"))
    now = _versions()
    raise ModelLoadError(
        f"the organism rebuilt from '{path}' differs from the model its weights were trained on: the "
        f"seeded {metadata.get('preset', PRESET)!r} preset (seed {metadata.get('seed', SEED)}) builds "
        f"differently here (made with torch {made.get('torch', '?')}, transformers "
        f"{made.get('transformers', '?')}; running torch {now['torch']}, transformers "
        f"{now['transformers']}). Install the versions it was made with, or retrain it here with "
        "`omnilab train organism --install` (`make organism`)"
    )
