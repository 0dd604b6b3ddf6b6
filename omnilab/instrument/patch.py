"""Set (patch) or add (steer) a tensor at the output of named sites, inside `lab.intervene`.

    with lab.intervene(set={"resid.2": clean[2]}): ...                 # run B with run A's layer-2 residual
    with lab.intervene(add={"resid.2": 4.0 * v}, modality="audio"): ...  # steer every audio token
    with lab.intervene(set={"attn.1": x}, at=[5, 6, 7]): ...             # only prompt positions 5-7

A value is a vector [width] (the same row everywhere it applies) or rows [n, width] (a leading batch
dimension of 1 is dropped): n = len(at) rows in the order of `at`, or, without `at`, one row per
prompt position (n must equal the prompt's length). Where it applies:
- `at` (positions in the component's own sequence, negative from the prompt's end) must lie in the
  prompt; without `at` a vector applies at every position, prompt and every generated token alike
  (a steering vector steers the whole reply), and rows apply to the prompt's positions only.
- `modality` (of Intervention) further limits it to that modality's tokens.
Sites are thinker, talker or code predictor residual, attention or MLP sites, or codec_head (aliases
or module paths, globs included: resolve_sites; the code predictor's positions are those of its own
16-position sequence, restarting every frame), their outputs or, with ":input" ("resid.3:input"), their inputs, and the
TransformerLens residual names resid_pre.L, resid_mid.L, resid_post.L (after deepstack). An input is
changed by a pre-hook, so the module and everything after it reads the patched value; resid_mid.L
(the sum of the layer's input and its attention output) is changed through the attention output, so
the layer's residual add gives the value asked for (within one float rounding: (x + (v - x)) may
differ from v in the last bit; rows left alone stay bit for bit). The hooks run before any recording
hook, so a trace records the patched values, and the patched tensor is a new one (the model's own is
never written in place).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InterventionError
from .context import model_lock
from .sites import Site, find_sites, resolve_sites, site_tensor, site_width

PATCHABLE_KINDS = ("residual", "attention", "mlp", "resid_pre", "resid_mid", "resid_post", "codec_head")
PATCHABLE_COMPONENTS = ("thinker", "talker", "code_predictor")
# Readable sites set/add do not reach, and where their values can be changed instead.
NOT_PATCHABLE = {
    "router": "routers take ablate=/force=/replay=",
    "audio_tower": "its rows land in the first layer's input at the audio placeholders: patch "
    "resid_pre.0 there (at= those positions, or modality='audio')",
    "vision_tower": "its rows land in the first layer's input at the image and video placeholders: "
    "patch resid_pre.0 there (at= those positions, or modality='image'/'video'); its deepstack "
    "features are added after the first layers: patch resid_post.L",
    "deepstack": "deepstack level L is added to the layer-L output at the vision placeholders: patch "
    "resid_post.L there",
    "attention": "the towers' attention runs over media patches, not the thinker's positions: patch "
    "the tower's landing positions in resid_pre.0",
}
INPUT_SUFFIX = ":input"  # "resid.3:input": the module's input, as lab.trace(sites=...) reads it


@dataclass(frozen=True)
class SitePatch:
    """One change at one site: `mode` "set" or "add", `value` [width] or [rows, width]; `inputs`:
    at the module's input (a ":input" site, or a site whose point is "input") instead of its output."""

    site: Site
    mode: str
    value: torch.Tensor
    inputs: bool = False

    @property
    def key(self) -> str:
        return self.site.alias + (INPUT_SUFFIX if self.inputs and self.site.point == "output" else "")


def check_positions(at) -> list[int] | None:
    """`at` as a list of ints (negative ones count from the prompt's end), or None for everywhere."""
    if at is None:
        return None
    values = [at] if isinstance(at, int) else list(at) if isinstance(at, (list, tuple, range)) else None
    if values is None or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise InterventionError(f"at= takes a position or a list of positions (ints); got {at!r}")
    if not values:
        raise InterventionError("at= is empty; give at least one prompt position, or leave it out")
    return [int(v) for v in values]


def build_patches(
    model, spec_set: dict | None, spec_add: dict | None, at: list[int] | None
) -> list[SitePatch]:
    """The SitePatch of every site that `set` and `add` name, their shapes checked against the model."""
    patches = []
    for mode, spec in (("set", spec_set), ("add", spec_add)):
        if spec is None:
            continue
        if not isinstance(spec, dict):
            raise InterventionError(f"{mode} is {{site: tensor}}; got {type(spec).__name__}")
        for pattern, value in spec.items():
            inputs = isinstance(pattern, str) and pattern.endswith(INPUT_SUFFIX)
            for site in resolve_sites(model, pattern[: -len(INPUT_SUFFIX)] if inputs else pattern):
                if site.kind not in PATCHABLE_KINDS or site.component not in PATCHABLE_COMPONENTS:
                    instead = NOT_PATCHABLE.get(site.kind, "")
                    raise InterventionError(
                        f"{mode}: {site.alias} is a {site.component} {site.kind} site, which set/add do "
                        f"not reach{'; ' + instead if instead else ''}. They work at thinker, talker and "
                        "code predictor residual, attention and MLP sites, outputs or inputs (resid.L, "
                        "resid_pre.L, resid_mid.L, resid_post.L, attn.L, mlp.L, resid.L:input, "
                        "talker.resid.L, code_predictor.resid.L ...) and at codec_head"
                    )
                if inputs and site.point == "input":
                    raise InterventionError(
                        f"{mode}: {site.alias} is already a module's input; name it without {INPUT_SUFFIX!r}"
                    )
                checked = _check_value(model, site, mode, pattern, value, at)
                patches.append(SitePatch(site, mode, checked, inputs or site.point == "input"))
    return patches


def _check_value(model, site: Site, mode: str, pattern: str, value, at) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as error:
            raise InterventionError(
                f"{mode}[{pattern!r}] is not a tensor ({type(value).__name__})"
            ) from error
    width = site_width(model, site)
    if value.ndim == 3 and value.shape[0] == 1:
        value = value[0]
    if value.ndim not in (1, 2) or value.shape[-1] != width:
        raise InterventionError(
            f"{mode}[{pattern!r}] has shape {tuple(value.shape)}; {site.alias} ({site.name}) has width "
            f"{width}: give a vector [{width}] or rows [positions, {width}]"
        )
    if value.ndim == 2 and at is not None and value.shape[0] != len(at):
        raise InterventionError(
            f"{mode}[{pattern!r}] has {value.shape[0]} rows but at= names {len(at)} positions: give "
            f"[{len(at)}, {width}] (one row per position of at=) or a vector [{width}]"
        )
    return value.detach()


def resolve_prompt_positions(at: list[int], length: int, component: str) -> list[int]:
    """`at` within a prompt of `length` positions (negative from its end); refuses positions outside it."""
    outside = [p for p in at if not -length <= p < length]
    if outside:
        raise InterventionError(
            f"at= positions {outside} are outside the {component}'s prompt (positions 0-{length - 1}, "
            f"or -{length}..-1 from its end); generated positions cannot be named in at="
        )
    return [p % length for p in at]


def apply_patch(
    patch: SitePatch,
    hidden: torch.Tensor,
    start: int,
    at: list[int] | None,
    modality_rows: torch.Tensor | None,
) -> torch.Tensor:
    """`hidden` [B, S, W] (rows at positions start .. start+S-1) with `patch` applied: a new tensor.

    `modality_rows` [B, S] (or [S]) limits it to those rows of each sequence of the batch.
    """
    batch, seq = hidden.shape[:2]
    value = patch.value.to(hidden.device, hidden.dtype)
    if at is not None:
        positions = torch.as_tensor(at, dtype=torch.long)
        source = torch.arange(len(at))
    elif value.ndim == 2:
        if start == 0 and value.shape[0] != seq:
            raise InterventionError(
                f"{patch.mode}[{patch.site.alias!r}] has {value.shape[0]} rows; the prompt has {seq} "
                f"positions: give [{seq}, {value.shape[1]}], a vector, or at= with {value.shape[0]} positions"
            )
        positions = torch.arange(min(value.shape[0], start + seq))
        source = positions
    else:
        positions, source = None, None
    if positions is None:
        rows = torch.ones(seq, dtype=torch.bool)
        index = None
    else:
        inside = (positions >= start) & (positions < start + seq)
        rows = torch.zeros(seq, dtype=torch.bool)
        rows[positions[inside] - start] = True
        index = torch.zeros(seq, dtype=torch.long)
        index[positions[inside] - start] = source[inside]
    mask = rows[None, :].expand(batch, seq)
    if modality_rows is not None:
        mask = mask & modality_rows.cpu().reshape(-1, seq).expand(batch, seq)
    if not bool(mask.any()):
        return hidden
    new = value.expand(seq, -1) if value.ndim == 1 else value[index.to(hidden.device)]  # [S, W]
    where = mask.to(hidden.device)[..., None]
    if patch.mode == "set":
        return torch.where(where, new.expand(batch, seq, -1), hidden)
    return torch.where(where, hidden + new, hidden)


# -- batched patching: the corrupted run once, then only the text model's layers from the patched one --
_LM_INPUTS = (
    "inputs_embeds",
    "attention_mask",
    "position_ids",
    "visual_pos_masks",
    "deepstack_visual_embeds",
)


@dataclass(frozen=True)
class RecordedRun:
    """One thinker forward, kept for patching: what its text model saw and its sites' outputs."""

    input_ids: torch.Tensor  # [L]
    lm_inputs: dict  # the text model's keyword inputs (batch 1): merged embeddings, positions, deepstack
    entering: tuple  # the hidden state entering each decoder layer, [1, L, H] each
    acts: dict  # site name -> its output [1, L, H]
    last_logits: torch.Tensor  # [vocab] float32, the next-token logits after the prompt


def record_run(lab, conversation, sites: list[Site], *, use_audio_in_video: bool = False) -> RecordedRun:
    """Run the thinker once over `conversation`'s prompt, keeping what a batched patch needs."""
    inputs = lab.prepare(conversation, use_audio_in_video=use_audio_in_video)
    language_model = lab.thinker.model.language_model
    kept: dict = {"acts": {}, "entering": {}}

    def keep_inputs(module, args, kwargs):
        kept["lm"] = {k: kwargs.get(k) for k in _LM_INPUTS}

    def keep_entering(layer):
        return lambda module, args, kwargs: kept["entering"].__setitem__(
            layer, (args[0] if args else kwargs["hidden_states"]).clone()
        )

    def keep(site):
        return lambda module, args, output: kept["acts"].__setitem__(site.name, site_tensor(output).clone())

    handles = [language_model.register_forward_pre_hook(keep_inputs, with_kwargs=True)]
    handles += [
        m.register_forward_pre_hook(keep_entering(i), with_kwargs=True)
        for i, m in enumerate(language_model.layers)
    ]
    handles += [s.module.register_forward_hook(keep(s)) for s in sites]
    try:
        with torch.inference_mode():
            logits = lab.thinker(**inputs, use_audio_in_video=use_audio_in_video).logits
    finally:
        for handle in handles:
            handle.remove()
    entering = tuple(kept["entering"][i] for i in range(len(language_model.layers)))
    return RecordedRun(
        inputs["input_ids"][0].cpu(), kept["lm"], entering, kept["acts"], logits[0, -1].float()
    )


def patched_last_logits(lab, run: RecordedRun, layer: int, sources: dict, masks: dict) -> torch.Tensor:
    """The last position's logits [B, vocab] (float32) of `run` with patches, B = the masks' rows.

    Only decoder layers `layer`.. run, from the hidden state that entered `layer` in `run` (the
    layers before are unchanged by a patch there); at each site of `masks` (name -> bool [B, L]) the
    output takes `sources[name]` ([1, L, H]) where the mask is True. The text model's own loop, final
    norm and mask run; its layer list is cut for the call (under the model's lock) and restored.
    """
    size = next(iter(masks.values())).shape[0]
    sites = {s.name: s for s in find_sites(lab.model) if s.name in masks}

    def hook(name):
        source, mask = sources[name], masks[name]

        def patch(module, args, output):
            hidden = site_tensor(output)
            new = torch.where(mask.to(hidden.device)[..., None], source.to(hidden.dtype), hidden)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return patch

    kwargs = _expanded(run.lm_inputs, size)
    kwargs["inputs_embeds"] = run.entering[layer].expand(size, -1, -1)
    deepstack = kwargs.pop("deepstack_visual_embeds", None)
    if deepstack is not None and len(deepstack) > layer:  # deepstack level j is added after layer j
        kwargs["deepstack_visual_embeds"] = deepstack[layer:]
    else:
        kwargs.pop("visual_pos_masks", None)
    language_model = lab.thinker.model.language_model
    with model_lock(lab.model):
        layers = language_model.layers
        handles = [sites[name].module.register_forward_hook(hook(name), prepend=True) for name in masks]
        language_model.layers = torch.nn.ModuleList(list(layers)[layer:])
        try:
            with torch.inference_mode():
                hidden = language_model(**kwargs, use_cache=False).last_hidden_state
                return lab.thinker.get_output_embeddings()(hidden[:, -1]).float()
        finally:
            language_model.layers = layers
            for handle in handles:
                handle.remove()


def _expanded(lm: dict, size: int) -> dict:
    """The text model's captured inputs (batch 1) repeated `size` times along the batch."""
    out = {}
    for key, value in lm.items():
        if value is None:
            continue
        if key == "deepstack_visual_embeds":
            out[key] = [v.repeat(size, 1) for v in value]  # the visual rows of every batch row, in order
        elif key == "position_ids":
            out[key] = value.expand(value.shape[0], size, *value.shape[2:]) if value.ndim == 3 else value
        else:
            out[key] = value.expand(size, *value.shape[1:])
    return out
