"""Train the organism's thinker on the synthetic world, through the model's own forward.

The world is drawn once and processed once through `lab.prepare`'s path (the cached tensors are
exactly what `generate` would see), then each step takes a batch of every task: the thinker's multimodal
model gives hidden states, the head runs only at the answer positions (the answer's tokens and
`<|im_end|>`; a 151,936-word head at every position is the main waste), plus a small router
balancing loss. AdamW with a warm-up and cosine decay. Step s's batch is a function of (seed, s)
alone, so a run resumed from its checkpoint continues exactly where it stopped. Every step sees a
batch of every task (their gradients summed, as one mixed batch would): one task per step, in
turns, left speech at its answer prior for 1,200 steps while the same steps on speech alone reach
100% held-out (measured, CARD.md).

Only the world's vocabulary rows of the embedding and head move (a gradient mask), so the shipped
file can hold just those rows and rebuild the rest from the preset's seed.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import load_balancing_loss_func

from ..conversation import batch_inputs
from . import world

log = logging.getLogger(__name__)

IM_START, IM_END, PAD = 151644, 151645, 151643
PRESET, SEED = "tiny", 0


@dataclass(frozen=True)
class Sample:
    """One example as model inputs: its tensors and where its answer starts."""

    task: str
    inputs: dict  # the BatchFeature's tensors, batch of one
    answer_start: int  # index of the answer's first token in input_ids
    use_audio_in_video: bool
    audio_shift: int = 0  # seconds the audio's TM-RoPE times move by (world.time_shifted)


@dataclass(frozen=True)
class TrainConfig:
    """What a training run does; equal configs give bit-identical runs on the CPU."""

    steps: int = 2000
    batch_size: int = 4  # of every task, each step
    lr: float = 3e-3
    warmup: int = 60
    aux_weight: float = 0.001
    shifted_share: float = 0.67  # of the beep examples not in the first second, trained with their audio's times moved (world.time_shifted)
    examples: int = 2500  # training examples drawn from the world (seed `data_seed`)
    data_seed: int = 1
    seed: int = 0
    save_every: int = 50


def prepare_samples(lab, examples: list[world.Example], *, progress: bool = True) -> list[Sample]:
    """Each example with its answer through `lab.prepare`'s path: the tensors training and eval use."""
    out = []
    for example in tqdm(examples, desc="prepare", disable=not progress, mininterval=2):
        inputs = lab.prepare(
            example.with_answer(), use_audio_in_video=example.use_audio_in_video, add_generation_prompt=False
        )
        ids = inputs["input_ids"][0]
        start = int((ids == IM_START).nonzero()[-1]) + 3  # <|im_start|> assistant \n
        inputs = {k: v.cpu() for k, v in inputs.items()}
        shift = int(example.facts.get("audio_shift", 0))
        out.append(Sample(example.task, inputs, start, example.use_audio_in_video, shift))
    return out


def audio_moved(input_ids: torch.Tensor, audio_id: int, shifts: torch.Tensor):
    """A positions transform (for `Intervention(positions=...)`): row b's audio tokens move by shifts[b].

    `shifts` are in position ids ([B]); other forwards (other shapes) pass unchanged.
    """
    moved = (input_ids == audio_id).long() * shifts.long()[:, None]

    def transform(t, h, w):
        if t.shape != moved.shape:
            return t, h, w
        return t + moved, h + moved, w + moved

    return transform


@contextmanager
def shifted_audio(model, batch: dict, seconds: torch.Tensor):
    """While open, `batch`'s audio tokens sit `seconds[b]` seconds later in TM-RoPE time (0: unmoved)."""
    if not bool(seconds.any()):
        yield
        return
    from ..instrument.interventions import Intervention
    from ..instrument.record import position_id_per_seconds, special_tokens

    shifts = torch.round(seconds.float() * position_id_per_seconds(model)).long()
    with Intervention(model, positions=audio_moved(batch["input_ids"], special_tokens(model).audio, shifts)):
        yield


def collate(samples: list[Sample]) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of one task's samples, right-padded: (inputs, rows, positions, targets).

    `positions` are the positions whose next-token prediction is scored (each answer token and
    <|im_end|>), `targets` the tokens they must predict.
    """
    batch = batch_inputs([s.inputs for s in samples], PAD)  # the store's padded batch
    rows, positions, targets = [], [], []
    for b, s in enumerate(samples):
        seq = s.inputs["input_ids"][0]
        end = int((seq[s.answer_start :] == IM_END).nonzero()[0]) + s.answer_start
        for p in range(s.answer_start, end + 1):
            rows.append(b)
            positions.append(p - 1)
            targets.append(int(seq[p]))
    return batch, torch.tensor(rows), torch.tensor(positions), torch.tensor(targets)


class VocabularyRows(torch.nn.Module):
    """The embedding and head rows of the world's vocabulary, trained in place of the full tables.

    Every other row stays at its seeded value, so the full-vocabulary logits are the frozen head's
    with the vocabulary's columns replaced: the same numbers the full model computes.
    """

    def __init__(self, thinker, ids: torch.Tensor):
        super().__init__()
        embed, head = thinker.model.get_input_embeddings().weight, thinker.lm_head.weight
        self.register_buffer("ids", ids)
        index = torch.full((embed.shape[0],), -1, dtype=torch.long)
        index[ids] = torch.arange(len(ids))
        self.register_buffer("index", index)
        self.embed = torch.nn.Parameter(embed.detach()[ids].clone())
        self.head = torch.nn.Parameter(head.detach()[ids].clone())
        self._frozen = [head]  # a list, so the full table is not registered (nor saved) as this module's

    def embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed[self.index[input_ids]]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            full = hidden.detach() @ self._frozen[0].T
        return full.index_copy(1, self.ids, hidden @ self.head.T)

    @torch.no_grad()
    def write_back(self, thinker) -> None:
        """Copy the trained rows into the thinker's full embedding and head."""
        thinker.model.get_input_embeddings().weight[self.ids] = self.embed
        thinker.lm_head.weight[self.ids] = self.head


def answer_logits(
    thinker, batch: dict, rows, positions, *, use_audio_in_video: bool, router: bool = False, vocab=None
):
    """The thinker's logits at the scored positions only [N, vocab], and its router logits when asked.

    With `vocab` (VocabularyRows), the embedding and head rows come from it (training).
    """
    embeds = vocab.embeddings(batch["input_ids"]) if vocab is not None else None
    out = thinker.model(
        **batch,
        inputs_embeds=embeds,
        use_audio_in_video=use_audio_in_video,
        output_router_logits=router,
        use_cache=False,
    )
    hidden = out.last_hidden_state[rows, positions]
    logits = vocab.logits(hidden) if vocab is not None else thinker.lm_head(hidden)
    return logits, (out.router_logits if router else None)


def vocabulary(samples: list[Sample]) -> torch.Tensor:
    """The sorted token ids the world uses (prompts and answers)."""
    ids = torch.cat([s.inputs["input_ids"][0] for s in samples])
    return torch.unique(torch.cat([ids, torch.tensor([PAD, IM_START, IM_END])]))


def _batches(by_task: dict[str, list[int]], step: int, config: TrainConfig) -> list[tuple[str, list[int]]]:
    """Step `step`'s batches: `batch_size` samples of every task, a function of (seed, step) alone."""
    out = []
    for number, task in enumerate(t for t in world.TASKS if t in by_task):
        pool = by_task[task]
        generator = torch.Generator().manual_seed((config.seed * 1_000_003 + step) * 8 + number)
        picks = torch.randperm(len(pool), generator=generator)[: config.batch_size]
        out.append((task, [pool[i] for i in picks.tolist()]))
    return out


def _lr(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_thinker(
    model,
    samples: list[Sample],
    config: TrainConfig,
    out_dir: Path,
    *,
    progress: bool = True,
    until: int | None = None,
) -> list[dict]:
    """Train `model.thinker` in place for `config.steps` steps; resume from `out_dir/checkpoint.pt`.

    `until` stops early after that step (with a checkpoint), as an interrupted run would.

    Returns the log: one dict per step (step, task, loss, aux, lr, seconds).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    thinker = model.thinker
    thinker.train()
    vocab = VocabularyRows(thinker, vocabulary(samples))
    tables = (thinker.model.get_input_embeddings().weight, thinker.lm_head.weight)
    params = [p for p in thinker.parameters() if all(p is not t for t in tables)] + list(vocab.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
    by_task: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_task.setdefault(s.task, []).append(i)
    checkpoint = out_dir / "checkpoint.pt"
    history_path = out_dir / "history.jsonl"
    start, history = 0, []
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        thinker.load_state_dict(state["thinker"])
        vocab.load_state_dict(state["vocab"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["step"], state["history"]
        log.info("resumed from %s at step %d", checkpoint, start)
    text_config = thinker.config.text_config
    bar = tqdm(total=config.steps, initial=start, desc="train organism", disable=not progress, mininterval=5)
    try:
        for step in range(start, min(config.steps, until or config.steps)):
            for group in optimizer.param_groups:
                group["lr"] = _lr(step, config)
            optimizer.zero_grad(set_to_none=True)
            losses = {}
            for task, picks in _batches(by_task, step, config):
                began = time.perf_counter()
                batch, b_rows, b_pos, targets = collate([samples[i] for i in picks])
                seconds = torch.tensor([samples[i].audio_shift for i in picks])
                with shifted_audio(model, batch, seconds):
                    logits, router = answer_logits(
                        thinker,
                        batch,
                        b_rows,
                        b_pos,
                        use_audio_in_video=task == "beep",
                        router=True,
                        vocab=vocab,
                    )
                loss = F.cross_entropy(logits, targets)
                aux = load_balancing_loss_func(
                    router, text_config.num_experts, text_config.num_experts_per_tok, batch["attention_mask"]
                )
                ((loss + config.aux_weight * aux) / len(by_task)).backward()
                losses[task] = loss.item()
                record = {
                    "step": step + 1,
                    "task": task,
                    "loss": round(loss.item(), 5),
                    "aux": round(aux.item(), 5),
                    "lr": _lr(step, config),
                    "seconds": round(time.perf_counter() - began, 4),
                }
                history.append(record)
                with history_path.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
            began = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            history[-1]["seconds"] = round(history[-1]["seconds"] + time.perf_counter() - began, 4)
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses.values()) / len(losses):.3f}")
            if (step + 1) % config.save_every == 0 or step + 1 in (config.steps, until):
                state = {
                    "thinker": thinker.state_dict(),
                    "vocab": vocab.state_dict(),
                    "optimizer": optimizer.state_dict(),
                }
                torch.save({**state, "step": step + 1, "history": history}, checkpoint.with_suffix(".tmp"))
                checkpoint.with_suffix(".tmp").replace(checkpoint)
    finally:
        bar.close()
        vocab.write_back(thinker)
        thinker.eval()
    return history


@torch.no_grad()
def correct(model, samples: list[Sample], *, batch_size: int = 32) -> list[bool]:
    """Per sample (in order), whether its greedy answer (teacher-forced argmax) is exactly right.

    An answer counts when every answer token and the closing <|im_end|> is the argmax: exactly
    what greedy generation would produce. Samples are batched by task (one forward per chunk).
    """
    thinker = model.thinker
    out: list[bool | None] = [None] * len(samples)
    by_task: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_task.setdefault(s.task, []).append(i)
    for group in by_task.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            picked = [samples[i] for i in chunk]
            batch, rows, positions, targets = collate(picked)
            with shifted_audio(model, batch, torch.tensor([s.audio_shift for s in picked])):
                logits, _ = answer_logits(
                    thinker, batch, rows, positions, use_audio_in_video=picked[0].use_audio_in_video
                )
            hit = logits.argmax(-1) == targets
            for b, i in enumerate(chunk):
                out[i] = bool(hit[rows == b].all())
    return [bool(v) for v in out]


def accuracy(model, samples: list[Sample], *, batch_size: int = 32) -> dict[str, float]:
    """Per task, the share of samples whose greedy answer is exactly right (see `correct`)."""
    right: dict[str, list[bool]] = {}
    for s, hit in zip(samples, correct(model, samples, batch_size=batch_size), strict=True):
        right.setdefault(s.task, []).append(hit)
    return {task: sum(v) / len(v) for task, v in right.items()}


def init_audio_front(thinker, *, gain: float = 4.0) -> None:
    """Re-draw the audio tower's convolution front (3 conv2d + conv_out) with Kaiming-normal weights,
    conv_out times `gain`.

    At the preset's init (normal, std 0.02) the three stacked convolutions shrink the mel features
    ~3000-fold (to std ~1e-4) under a positional embedding of std ~1, so audio tokens carry almost
    no content and training sat at the answer prior for 850 steps (measured). Kaiming init keeps
    the features' scale (conv_out's output std ~0.4); the gain lifts it above the positional
    embedding's (~0.7): 150 steps of speech alone reach 55% held-out with gain 4, 30% with gain 1
    (measured). The architecture is unchanged and the trained weights ship like the others.
    """
    tower = thinker.model.audio_tower
    with torch.no_grad():
        for module in (tower.conv2d1, tower.conv2d2, tower.conv2d3, tower.conv_out):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                module.bias.zero_()
        tower.conv_out.weight.mul_(gain)


def world_samples(
    lab, n: int, seed: int, folder: Path, *, shifted_share: float = 0.0, progress: bool = True
) -> list[Sample]:
    """`n` examples of the world drawn from `seed`, prepared; cached in `folder` (samples-SEED-N[-sSHARE].pt).

    With `shifted_share`, that share of the beep examples whose beep is not in the first second
    become `world.time_shifted` (moved back 1 to `second` seconds, drawn from (seed, index)).
    """
    folder.mkdir(parents=True, exist_ok=True)
    cache = folder / (f"samples-{seed}-{n}" + (f"-s{shifted_share:g}" if shifted_share else "") + ".pt")
    if cache.is_file():
        return torch.load(cache, weights_only=False)
    examples = world.draw(n, seed=seed, folder=folder / f"media-{seed}")
    for i, example in enumerate(examples):
        rng = np.random.default_rng([seed, i, 1])
        if example.task == "beep" and example.facts["second"] > 0 and rng.random() < shifted_share:
            examples[i] = world.time_shifted(example, -int(rng.integers(1, example.facts["second"] + 1)))
    samples = prepare_samples(lab, examples, progress=progress)
    torch.save(samples, cache.with_suffix(".tmp"))
    cache.with_suffix(".tmp").replace(cache)
    return samples


def run(out_dir: str | Path, config: TrainConfig = TrainConfig(), *, progress: bool = True):
    """The whole thinker training: the preset from its seed, the world's samples, the steps.

    Returns (model, history); resumes from `out_dir`'s checkpoint when there is one.
    """
    from ..lab import OmniLab
    from ..models.loading import load_model

    out_dir = Path(out_dir)
    loaded = load_model(PRESET, seed=SEED)
    torch.manual_seed(config.seed)
    init_audio_front(loaded.model.thinker)
    samples = world_samples(
        OmniLab(loaded),
        config.examples,
        config.data_seed,
        out_dir,
        shifted_share=config.shifted_share,
        progress=progress,
    )
    history = train_thinker(loaded.model, samples, config, out_dir, progress=progress)
    return loaded, history
