"""Peak resident memory of a few training steps of one loop variant, one subprocess per variant."""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
from typing import Any, Dict, Optional, Sequence

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/
ROOT = os.path.dirname(HERE)


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the process's peak resident set (VmHWM) to its current size (Linux ``clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_child(variant: str, model_name: str, steps: int, device: str, precision: str, threads: int) -> Dict[str, Any]:
    """In the child: build the model, run ``steps`` steps of ``variant``, return the peak memory.

    The peak is the VmHWM over the training steps only: it is reset after the model is built (building a randomly
    initialised model peaks higher than training it). ``ru_maxrss`` cannot be used: it starts from the parent's
    resident size at ``fork``.
    """
    from cost.config import MODELS, METHODS
    from cost.loop import Loop
    from cost.models import build_model, make_batch, quiet, tensor_bytes

    quiet()
    # the NEFTune baseline imports transformers' trainer utilities (~10 MiB resident): loaded in every variant, so
    # that the import does not count as that baseline's memory
    import transformers.integrations.neftune  # noqa: F401

    torch.set_num_threads(threads)
    dev = torch.device(device)
    model = build_model(model_name).to(dev)
    spec = MODELS[model_name]
    batch = {k: v.to(dev) for k, v in make_batch(model, spec["batch"], spec["seq"]).items()}
    method = variant.split("_", 1)[1] if "_" in variant else None
    loop = Loop(model, batch, dev, precision, [method] if method in METHODS else [], references=variant.startswith("ref_"))
    fn = loop.variant(variant)
    gc.collect()
    rss_before = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(steps):
        fn()
    loop.synchronize()
    out = dict(variant=variant, params=sum(p.numel() for p in model.parameters()),
               weight_bytes=tensor_bytes(list(model.parameters())), rss_before_kib=rss_before,
               peak_kib=_status_kib("VmHWM") if reset else None,
               maxrss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    if dev.type == "cuda":
        out["cuda_max_allocated"] = torch.cuda.max_memory_allocated(dev)
    return out


def measure_peaks(variants: Sequence[str], model_name: str, steps: int, device: str, precision: str,
                  verbose: bool = False) -> Dict[str, Any]:
    """One subprocess per variant (the parent's heap does not count)."""
    results: Dict[str, Any] = {}
    for variant in variants:
        args = json.dumps([variant, model_name, steps, device, precision, torch.get_num_threads()])
        code = (f"import sys, json; sys.path[:0] = {[ROOT, HERE]!r}; from cost.memory import peak_child; "
                f"print('PEAK ' + json.dumps(peak_child(*json.loads({args!r}))), flush=True)")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                              env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PEAK ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"peak-memory run {variant} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        results[variant] = json.loads(line[5:])
        if verbose:
            peak = results[variant]["peak_kib"] or results[variant]["maxrss_kib"]
            print(f"  [peak {model_name}] {variant}: {peak / 1024:.0f} MiB", flush=True)
    return results
