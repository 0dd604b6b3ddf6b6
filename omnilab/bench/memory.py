"""`omnilab bench memory`: peak resident memory of a traced turn against the bare turn, in one run.

On `small`, at 512, 2k and 8k prompt tokens (mixed audio, image, video and text), each turn runs in a
fresh process (two new tokens, no speech): bare, and traced as the app traces by default (routing,
positions, and attention of the thinker's first and last layers with the default AttentionSettings:
whole rows of the last prompt token and the generated ones, every query's mass per modality block).
Measured 2026-12-02 on 2 shared cores: traced / bare 1.00, 1.09, 1.05 at 512, 2k, 8k tokens (bare
1.6-1.9 GB; the traced turn's extra stays under 150 MB, within the noise of peak RSS, so its growth
exponent is noisy and below 1). A bare 10k-token turn peaked at 7.5 GB before generate kept only the
last row of the thinker's logits, 2.0 GB after. Peak RSS comes from the kernel's
rusage of each child. Targets: traced / bare <= 1.5 at 8k tokens, and the traced turn's extra memory
growing no faster than linearly in tokens (exponent <= 1.1 from 2k to 8k). A child is killed when it
passes `limit_gb`, and the run reports that instead of taking the machine down.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import psutil

TARGET_RATIO = 1.5
TARGET_EXPONENT = 1.1

_CHILD = """
import json, sys
import omnilab
from omnilab.bench._common import mixed_conversation
args = json.loads(sys.argv[1])
lab = omnilab.load(args["model"])
conversation = mixed_conversation(lab, args["tokens"])
tokens = int(lab.prepare(conversation)["input_ids"].shape[1])
if args["traced"]:
    last = lab.thinker.config.text_config.num_hidden_layers - 1
    layers = {"thinker": sorted({0, last})}
    with lab.trace(capture=("routing", "positions", "attention"), attention_layers=layers) as tracer:
        lab.generate(conversation, max_new_tokens=2, return_audio=False)
    rows = len(tracer.trace.attention)
else:
    lab.generate(conversation, max_new_tokens=2, return_audio=False)
    rows = 0
print(json.dumps({"tokens": tokens, "attention_rows": rows}))
"""


def _child(model: str, tokens: int, traced: bool, limit_bytes: int) -> dict:
    """Run one turn in a fresh process; its peak RSS (MB, the kernel's rusage of that child), or why it stopped."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        args = json.dumps({"model": model, "tokens": tokens, "traced": traced})
        process = subprocess.Popen([sys.executable, "-c", _CHILD, args], stdout=out, stderr=err, text=True)
        watched, killed = psutil.Process(process.pid), False
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)  # reaped here, so rusage is its own
            if pid:
                break
            with contextlib.suppress(psutil.NoSuchProcess):
                if not killed and watched.memory_info().rss > limit_bytes:
                    process.kill()
                    killed = True
            time.sleep(0.05)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    result = {"peak_mb": usage.ru_maxrss / 1024}
    if killed:
        result["error"] = f"killed over the {limit_bytes / 2**30:.1f} GB limit"
    elif process.returncode:
        result["error"] = (stderr.strip().splitlines() or [f"exited {process.returncode}"])[-1][:300]
    else:
        result.update(json.loads(stdout.strip().splitlines()[-1]))
    return result


def run(model: str = "small", sizes=(512, 2048, 8192), limit_gb: float | None = None) -> dict:
    limit_gb = limit_gb or min(16.0, 0.7 * psutil.virtual_memory().available / 2**30)
    limit = int(limit_gb * 2**30)
    figures: dict = {"model": model, "limit_gb": round(limit_gb, 1)}
    extra = {}
    for size in sizes:
        bare, traced = _child(model, size, False, limit), _child(model, size, True, limit)
        key = f"{size}"
        figures[f"bare_mb_{key}"] = round(bare["peak_mb"], 1)
        figures[f"traced_mb_{key}"] = round(traced["peak_mb"], 1)
        for name, result in (("bare", bare), ("traced", traced)):
            if "error" in result:
                figures[f"{name}_error_{key}"] = result["error"]
        if "tokens" in traced:
            figures[f"tokens_{key}"] = traced["tokens"]
            figures[f"attention_rows_{key}"] = traced["attention_rows"]
        figures[f"traced_over_bare_{key}"] = traced["peak_mb"] / bare["peak_mb"]
        extra[size] = max(traced["peak_mb"] - bare["peak_mb"], 1.0)
    largest = max(sizes)
    figures["target_ratio"] = TARGET_RATIO
    failed = any(k.endswith(f"error_{largest}") for k in figures)
    figures["pass_ratio"] = not failed and figures[f"traced_over_bare_{largest}"] <= TARGET_RATIO
    if len(sizes) >= 2:
        a, b = sorted(sizes)[-2:]
        exponent = math.log(extra[b] / extra[a]) / math.log(b / a)
        figures["extra_growth_exponent"] = exponent
        figures["pass_growth"] = not failed and exponent <= TARGET_EXPONENT
        figures["verdict"] = (
            f"traced/bare {figures[f'traced_over_bare_{largest}']:.2f} at {largest} tokens (target <= "
            f"{TARGET_RATIO}): {'pass' if figures['pass_ratio'] else 'FAIL'}; extra memory grows as "
            f"tokens^{exponent:.2f} (target <= {TARGET_EXPONENT}): {'pass' if figures['pass_growth'] else 'FAIL'}"
        )
    return figures
