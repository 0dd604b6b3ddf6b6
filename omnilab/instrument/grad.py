"""Gradients of a metric at thinker sites, from one forward with its graph kept and one backward.

    metric = logit_difference(lab, " red", " blue")           # at the last position
    g = lab.gradients(conversation, metric, sites=["resid.*", "attn.2.z"])
    g.grads["resid.3"].values       # d metric / d resid.3, [rows, width] float32; .rows: pos, modality ...
    g.activations["resid.3"].values # the activation itself, [rows, width]
    g.metric                        # the metric's value

    lab.gradients(conversation, "answer_loss", answer=" red")  # the answer's tokens appended: their loss

The thinker runs once over the prompt with autograd on (not under inference_mode), the site tensors
are kept where the model computed them (forward hooks, pre-hooks for input points and heads), and
`torch.autograd.grad` takes the metric's gradient with respect to each; the parameters' own
gradients are never computed or stored. Sites: the thinker's residual, attention and MLP sites
(resid.L, attn.L, mlp.L, resid_pre.L, resid_mid.L, resid_post.L, ":input") and heads (attn.L.z,
[rows, heads, head_dim]). The memory is that of training on one prompt: the activations of the
whole forward are held until the backward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..activations import Activations
from ..errors import InterventionError
from .context import model_lock
from .record.tokens import special_tokens
from .sites import resolve_sites, site_tensor
from .units import is_unit, resolve_unit

GRAD_KINDS = ("residual", "attention", "mlp", "resid_pre", "resid_mid", "resid_post")
INPUT_SUFFIX = ":input"


@dataclass(frozen=True)
class Gradients:
    """A metric's value and its gradient at each site (site key -> Activations, float32)."""

    metric: float
    activations: dict
    grads: dict
    input_ids: torch.Tensor  # [L] the forward's tokens (the answer's included)
    last_logits: torch.Tensor  # [vocab] float32, after the last token


def token_id(lab, token) -> int:
    """A token id from an id or a text (its first token)."""
    if isinstance(token, (int, np.integer)) and not isinstance(token, bool):
        return int(token)
    if isinstance(token, str):
        ids = lab.processor.tokenizer.encode(token, add_special_tokens=False)
        if ids:
            return int(ids[0])
    raise InterventionError(f"a token is an id or a non-empty text; got {token!r}")


def logit_difference(lab, good, bad, *, position: int = -1) -> Callable[[torch.Tensor], torch.Tensor]:
    """metric(logits [L, vocab]) = logits[position, good] - logits[position, bad] (ids or texts)."""
    a, b = token_id(lab, good), token_id(lab, bad)
    return lambda logits: logits[position, a] - logits[position, b]


def token_logprob(lab, token, *, position: int = -1) -> Callable[[torch.Tensor], torch.Tensor]:
    """metric(logits [L, vocab]) = log p(token) at `position`."""
    t = token_id(lab, token)
    return lambda logits: torch.log_softmax(logits[position].float(), -1)[t]


def answer_loss(answer_ids: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """metric(logits [L, vocab]) = the mean cross-entropy of the last len(answer_ids) tokens, each
    predicted from the position before it (the loss a fine-tune on the answer would take)."""
    n = len(answer_ids)
    target = torch.tensor(answer_ids)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        predicted = logits[-n - 1 : -1].float()
        return torch.nn.functional.cross_entropy(predicted, target.to(predicted.device))

    return metric


def _targets(model, sites) -> list[tuple[str, object, str]]:
    """(key, site or unit, how) of each pattern: how is "output", "input", "heads"."""
    patterns = [sites] if isinstance(sites, str) else list(sites)
    out = []
    for pattern in patterns:
        if is_unit(pattern):
            unit = resolve_unit(model, pattern)
            if unit.kind != "heads" or unit.component != "thinker" or unit.index is not None:
                raise InterventionError(
                    f"gradients: {pattern} is not a thinker heads site; use attn.L.z (all heads of layer L)"
                )
            out.append((unit.alias, unit, "heads"))
            continue
        inputs = pattern.endswith(INPUT_SUFFIX)
        for site in resolve_sites(model, pattern[: -len(INPUT_SUFFIX)] if inputs else pattern):
            if site.component != "thinker" or site.kind not in GRAD_KINDS:
                raise InterventionError(
                    f"gradients: {site.alias} is a {site.component} {site.kind} site; gradients are taken at "
                    "thinker residual, attention and MLP sites (resid.*, attn.L, mlp.L, resid_pre.L ...) "
                    "and heads (attn.L.z)"
                )
            point = inputs or getattr(site, "point", "output") == "input"
            key = site.alias + (INPUT_SUFFIX if inputs else "")
            out.append((key, site, "input" if point else "output"))
    return out


def gradients(
    lab,
    conversation,
    metric,
    *,
    sites="resid.*",
    answer=None,
    use_audio_in_video: bool = False,
    last_only: bool = False,
) -> Gradients:
    """The metric's gradient at every site of `sites`, from one forward and one backward.

    metric: a function of the thinker's logits [L, vocab] (float32 as the model gives them) returning
    a scalar tensor (logit_difference, token_logprob), a token (id or text: its log-probability
    after the prompt), or "answer_loss" with `answer` (a text or ids, appended to the prompt; its
    mean cross-entropy). last_only: the head computes the last position's logits only (the metric
    gets [1, vocab]: a metric of the next token, at a fraction of the cost). Returns Gradients: metric, activations and grads (key -> Activations with
    values [rows, width] float32, heads [rows, heads, head_dim], and rows: component, phase, step,
    pos, modality, token_id), input_ids, last_logits.
    """
    targets = _targets(lab.model, sites)
    inputs = dict(lab.prepare(conversation, use_audio_in_video=use_audio_in_video))
    answer_ids: list[int] = []
    if answer is not None:
        answer_ids = (
            lab.processor.tokenizer.encode(answer, add_special_tokens=False)
            if isinstance(answer, str)
            else [int(a) for a in answer]
        )
        if not answer_ids:
            raise InterventionError("answer is empty; give the answer's text or token ids")
        ids = inputs["input_ids"]
        extra = torch.tensor([answer_ids], dtype=ids.dtype, device=ids.device)
        inputs["input_ids"] = torch.cat([ids, extra], dim=1)
        if inputs.get("attention_mask") is not None:
            mask = inputs["attention_mask"]
            inputs["attention_mask"] = torch.cat([mask, torch.ones_like(extra, dtype=mask.dtype)], dim=1)
    if isinstance(metric, str) and metric == "answer_loss":
        if not answer_ids:
            raise InterventionError('metric "answer_loss" needs answer= (the text or ids of the answer)')
        metric = answer_loss(answer_ids)
    elif not callable(metric):
        metric = token_logprob(lab, metric)
    kept: dict[str, torch.Tensor] = {}

    def keep_output(key):
        return lambda module, args, output: kept.__setitem__(key, site_tensor(output))

    def keep_input(key):
        def hook(module, args, kwargs):
            kept[key] = args[0] if args else kwargs["hidden_states"]

        return hook

    def needs_grad(module, args, output):  # a frozen model: the graph starts at the embeddings
        return output if output.requires_grad else output.detach().requires_grad_()

    handles = []
    with model_lock(lab.model):
        try:
            handles.append(lab.thinker.get_input_embeddings().register_forward_hook(needs_grad))
            if last_only:
                head = lab.thinker.get_output_embeddings()
                handles.append(head.register_forward_pre_hook(lambda module, args: (args[0][:, -1:],)))
            for key, target, how in targets:
                if how == "output":
                    handles.append(target.module.register_forward_hook(keep_output(key)))
                elif how == "heads":
                    handles.append(target.module.register_forward_pre_hook(keep_input(key), with_kwargs=True))
                else:
                    handles.append(target.module.register_forward_pre_hook(keep_input(key), with_kwargs=True))
            with torch.inference_mode(False), torch.enable_grad():
                logits = lab.thinker(**inputs, use_audio_in_video=use_audio_in_video).logits[0]
                value = metric(logits)
                if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.requires_grad:
                    raise InterventionError(
                        "the metric must return a scalar tensor computed from the logits with torch "
                        f"operations (got {type(value).__name__}); e.g. logits[-1, a] - logits[-1, b]"
                    )
                missing = [key for key, _, _ in targets if key not in kept]
                if missing:
                    raise InterventionError(f"gradients: {missing} did not run in this forward")
                tensors = [kept[key] for key, _, _ in targets]
                grads = torch.autograd.grad(value.reshape(()), tensors, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
    ids = inputs["input_ids"][0].detach().cpu()
    rows = _rows(lab, ids)
    activations, gradients_ = {}, {}
    for (key, target, how), tensor, grad in zip(targets, tensors, grads, strict=True):
        values = tensor.detach()[0].float()
        grad = torch.zeros_like(values) if grad is None else grad.detach()[0].float()
        if how == "heads":
            values = values.reshape(values.shape[0], target.heads, target.head_dim)
            grad = grad.reshape(values.shape)
        name = target.alias if how == "heads" else target.name
        activations[key] = Activations(key, name, rows, values.cpu())
        gradients_[key] = Activations(key, name, rows, grad.cpu())
    return Gradients(float(value.detach()), activations, gradients_, ids, logits[-1].detach().float().cpu())


def _rows(lab, ids: torch.Tensor) -> pd.DataFrame:
    n = len(ids)
    modality = special_tokens(lab.model).modality_names(ids)
    return pd.DataFrame(
        {
            "component": "thinker",
            "phase": "prefill",
            "step": np.zeros(n, dtype=np.int32),
            "pos": np.arange(n, dtype=np.int32),
            "modality": modality,
            "token_id": ids.numpy().astype(np.int64),
        }
    )
