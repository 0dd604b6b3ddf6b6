"""`omnilab bench activations`: what recording the residual stream costs on `small`, ~512 mixed tokens.

In one run: the thinker forward recording every layer's residual stream at every position
(`lab.trace(sites="resid.*")`, float16) / the bare forward (target <= 1.10), beside nnsight saving
the same layer outputs / bare (the traced ratio should not exceed nnsight's); and the capture's
peak memory above the bare forward's peak / the captured tensors' size (target <= 1.2): on a GPU
the device's peak (torch.cuda.max_memory_allocated), on the CPU the peak of bytes allocated in the
C heap (glibc mallinfo2, sampled around every module's forward). The patching sweep's
speed-up (batched / one forward per patch) comes from `omnilab.bench.patching.sweep_speedup(lab)`
where that module exists.
"""

from __future__ import annotations

import ctypes
import gc

import torch

from ._common import best_of_interleaved, load_lab, mixed_conversation

TARGET = 1.10
TARGET_MEMORY = 1.2
SITES = "resid.*"


def run(model: str = "small", device: str | None = None, tokens: int = 512, repeats: int = 5) -> dict:
    lab = load_lab(model, device)
    inputs = lab.prepare(mixed_conversation(lab, tokens))
    thinker = lab.model.thinker
    n = int(inputs["input_ids"].shape[1])
    layers = thinker.config.text_config.num_hidden_layers

    def bare():
        with torch.inference_mode():
            thinker(**inputs)

    def traced():
        with lab.trace(capture=(), sites=SITES, dtype=torch.float16) as tracer, torch.inference_mode():
            thinker(**inputs)
        return tracer.trace

    figures = {"model": lab.model_id, "tokens": n, "layers": layers, "sites": SITES}
    runs = {"bare": bare, "traced": traced}
    peer = _nnsight(thinker, inputs)
    if callable(peer):
        runs["nnsight"] = peer
    else:
        figures["nnsight_error"] = peer
    best = best_of_interleaved(runs, repeats)
    figures["bare_s"] = best["bare"]
    figures["traced_s"] = best["traced"]
    figures["traced_over_bare"] = best["traced"] / best["bare"]
    figures["target"] = TARGET
    if "nnsight" in best:
        figures["nnsight_s"] = best["nnsight"]
        figures["nnsight_over_bare"] = best["nnsight"] / best["bare"]
    figures["pass"] = figures["traced_over_bare"] <= TARGET and figures["traced_over_bare"] <= figures.get(
        "nnsight_over_bare", float("inf")
    )
    figures.update(_memory(bare, traced))
    figures.update(_patching(lab, tokens))
    return figures


def _memory(bare, traced) -> dict:
    """Peak memory of the traced forward above the bare one, against what it captured."""
    cuda = torch.cuda.is_available() and torch.cuda.memory_allocated() > 0
    measure = _cuda_peak if cuda else _host_peak
    bare_peak = measure(bare)
    holder = []
    traced_peak = measure(lambda: holder.append(traced()))
    trace = holder[0]
    captured = sum(a.values.numel() * a.values.element_size() for a in trace.activations.values())
    extra = traced_peak - bare_peak
    return {
        "memory_measured_on": "cuda" if cuda else "cpu (mallinfo2)",
        "captured_mb": captured / 2**20,
        "capture_peak_extra_mb": extra / 2**20,
        "capture_peak_over_captured": extra / captured if captured else float("nan"),
        "target_memory": TARGET_MEMORY,
        "pass_memory": extra <= TARGET_MEMORY * captured,
    }


def _cuda_peak(fn) -> int:
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"
        )
    ]  # fmt: skip


def _host_peak(fn) -> int:
    """Peak bytes `fn` holds allocated in the C heap above what was allocated before it (glibc's
    mallinfo2 over all arenas, sampled before and after every module's forward). Allocated bytes,
    not resident pages: freed heap pages stay resident and are reused, which hides a small capture
    from the resident size."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2

    def allocated() -> int:
        info = libc.mallinfo2()
        return int(info.uordblks + info.hblkhd)

    gc.collect()
    base = allocated()
    peak = [base]

    def sample(*_):
        peak[0] = max(peak[0], allocated())

    hooks = [
        torch.nn.modules.module.register_module_forward_pre_hook(sample),
        torch.nn.modules.module.register_module_forward_hook(sample),
    ]
    try:
        fn()
        sample()
    finally:
        for hook in hooks:
            hook.remove()
    return peak[0] - base


def _patching(lab, tokens: int) -> dict:
    """The patching sweep's figures (omnilab.bench.patching), each key prefixed `patching_`."""
    from .patching import sweep_speedup

    return {f"patching_{k}": v for k, v in sweep_speedup(lab, tokens=tokens).items()}


def _nnsight(thinker, inputs):
    """The same capture with nnsight (every decoder layer's output saved) as a callable, or why it cannot run."""
    try:
        from nnsight import NNsight

        wrapped = NNsight(thinker)
        layers = len(thinker.model.language_model.layers)

        def run_nnsight():
            saved = []  # nnsight runs the block in its own frame: collect into a list made outside it
            with torch.inference_mode(), wrapped.trace(**inputs):
                for i in range(layers):
                    saved.append(wrapped.model.language_model.layers[i].output.save())
            return saved

        saved = run_nnsight()  # fails here, not inside the timing, if nnsight cannot trace this model
        if len(saved) != layers:
            return f"nnsight saved {len(saved)} of {layers} layer outputs"
        return run_nnsight
    except Exception as exc:  # the peer is optional; report why it did not run
        return f"{type(exc).__name__}: {str(exc)[:200]}"
