#!/usr/bin/env python
"""The cost of an attack in units of one forward+backward, with its spread and the load it was measured under.

    X = (T_attack - T_plain) / T_fwd+bwd

The measurement is in ``benchmarks/cost/`` (see its ``__init__``); this script parses the arguments, runs it and
writes the report (Markdown, keeping a hand-written ``## Notes`` section of an existing file, and JSON). Variants:
a hand-written loop without attack (``plain``), a forward+backward of the same batch (``fwd_bwd``, the unit), the
loop with the reference snippets (``ref_<method>``) and with our methods (``ours_<method>``), Lightning without
(``L_plain``) and with our callbacks (``L_<method>``); limits: the number of adversarial passes; bars: the limit plus
the issue's tolerance (0.10; NEFTune 0.05).

Usage::

    python benchmarks/attack_cost.py --quick                        # a tiny BERT, ~20 s (the smoke test)
    python benchmarks/attack_cost.py --models small,minilm --rounds 7 --steps 3 --threads 1 --peak-model none \\
        --out benchmarks/results/attack_cost.md --json benchmarks/results/attack_cost.json -v
                                                                    # the full CPU table, one thread (~41 min)
    python benchmarks/attack_cost.py --methods freelb,pgd --no-lightning --peak-model none   # a subset
    python benchmarks/attack_cost.py --device cuda --precision bf16,fp16,fp32 --models minilm,base --batch 32 --seq 128
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (os.path.dirname(HERE), HERE):
    if _path not in sys.path:
        sys.path.insert(0, _path)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from cost import allocator, clocks  # noqa: E402
from cost.config import LR, METHODS, MODELS, PARAMETER_METHODS, PRECISIONS, bar, peak_variants, short, tolerance  # noqa: E402
from cost.memory import measure_peaks  # noqa: E402
from cost.models import machine, quiet  # noqa: E402
from cost.rounds import Options, measure_model  # noqa: E402
from cost.stats import verdict  # noqa: E402

CLOCK_WORDS = {"cpu": "process CPU time (`time.process_time`)", "wall": "wall time (`time.perf_counter`)"}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="small,minilm", help=f"comma-separated, among {', '.join(MODELS)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, among {', '.join(METHODS)}")
    p.add_argument("--rounds", default="7", help="interleaved rounds: a count, or per model (small:13,minilm:9)")
    p.add_argument("--steps", default="3", help="timed steps per variant and round (paired: cycles per method and "
                                               "round); a count, or per model")
    p.add_argument("--design", choices=("paired", "blocks"), default="paired",
                   help="paired: X from steps run seconds apart (cycles of one step per variant; Lightning fits "
                        "attacking every other step; cost/paired.py); blocks: every variant's steps in a block, X from "
                        "the blocks' medians per round (cost/rounds.py)")
    p.add_argument("--block-warmup", type=int, default=1, help="untimed steps of a loop variant in every round")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps of every loop variant before the rounds")
    p.add_argument("--lightning-warmup", type=int, default=1, help="steps dropped at the start of every fit")
    p.add_argument("--batch", type=int, default=None, help="override the model's batch size")
    p.add_argument("--seq", type=int, default=None, help="override the model's sequence length")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: 1 on the CPU, where X is defined on one thread; torch's default on CUDA)")
    p.add_argument("--clock", choices=sorted(CLOCK_WORDS), default=None,
                   help="clock of the main table (default: cpu on the CPU with one thread, else wall); both are recorded")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--malloc", choices=allocator.MODES, default="retain",
                   help="host allocator: 'retain' keeps freed memory in the process (no page faults from the "
                        "allocator's history; cost/allocator.py), 'system' keeps glibc's defaults")
    p.add_argument("--precision", default="fp32", help="fp32, fp16 (autocast + GradScaler) or bf16; comma-separated: one after the other")
    p.add_argument("--no-lightning", action="store_true", help="time the hand-written loop only")
    p.add_argument("--no-count", action="store_true", help="skip the load-free counts (FLOPs, operators, passes)")
    p.add_argument("--peak-model", default="base", help="model of the peak-memory subprocesses ('none' to skip)")
    p.add_argument("--peak-methods", default=None, help="variants of the peak-memory runs (default: plain, ref_ and ours_ of every method)")
    p.add_argument("--peak-steps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny model, 2 rounds of 1 step, no peak-memory runs (the smoke test)")
    p.add_argument("--out", default=None, help="write the Markdown report here")
    p.add_argument("--json", default=None, help="write the raw results here")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.method_list = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.method_list if m not in METHODS]
    if unknown or not args.method_list:
        p.error(f"--methods: unknown {unknown}; choose among {', '.join(METHODS)}")
    bad = [x for x in args.precision.split(",") if x not in PRECISIONS]
    if bad or not args.precision:
        p.error(f"--precision: unknown {bad}; choose among {', '.join(PRECISIONS)} (comma-separated)")
    if args.quick:
        args.models, args.rounds, args.steps, args.warmup, args.block_warmup = "tiny", "2", "1", 1, 0
        if "--peak-model" not in (argv if argv is not None else sys.argv[1:]):
            args.peak_model = "none"
    if args.peak_methods is None:
        args.peak_methods = ",".join(peak_variants(args.method_list))
    return args


# -- the report --------------------------------------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / 2**10:.1f} KiB" if 0 < n < 2**20 / 10 else f"{n / 2**20:.1f} MiB"


def _x(d: Optional[Dict[str, Any]], signed: bool = False) -> str:
    if not d:
        return "–"
    f = "+.2f" if signed else ".2f"
    return f"{d['value']:{f}} [{d['lo']:{f}}, {d['hi']:{f}}]"


def _iqr(d: Dict[str, Any]) -> str:
    return f"{d['q1']:.2f}–{d['q3']:.2f}"


def _table(head: List[str], rows: List[List[Any]], left: int = 2) -> List[str]:
    return (["| " + " | ".join(head) + " |", "|" + "---|" * left + "---:|" * (len(head) - left)]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _tolerances(methods: Sequence[str]) -> str:
    """``limit + 0.10; NEFTune limit + 0.05``: the tolerances of ``methods``, the most common first."""
    counts: Dict[float, List[str]] = {}
    for m in methods:
        counts.setdefault(tolerance(m), []).append(short(m))
    ordered = sorted(counts.items(), key=lambda kv: -len(kv[1]))
    parts = [f"limit + {t:.2f}" if i == 0 else f"{', '.join(names)} limit + {t:.2f}" for i, (t, names) in enumerate(ordered)]
    return "; ".join(parts)


def diagnose(results: Dict[str, Any], clock: str) -> List[str]:
    """One line per X over its bar (or undecided): more passes than the limit is a regression of the engine; the
    limit's passes under load is load until a quiet run says otherwise; on a quiet machine it is overhead outside the
    passes, to bisect with ``compare_commits.py``."""
    out = []
    for res in results["models"]:
        load = res["load"]["verdict"]
        for m in results["args"]["method_list"]:
            for path, key, variant in (("loop", "ours", f"ours_{m}"), ("Lightning", "lightning", f"L_{m}")):
                x = res["X"][clock][m].get(key)
                if not x or verdict(x, m) == "yes":
                    continue
                cnt, limit = res["counts"].get(variant), METHODS[m]["limit"]
                passes = f"{cnt['forwards'] - 1} / {cnt['backwards'] - 1}" if cnt else "not counted"
                flops = f", X by FLOPs {res['X_flops'][variant]:.2f}" if variant in res.get("X_flops", {}) else ""
                if cnt and max(cnt["forwards"], cnt["backwards"]) - 1 > limit:
                    why = "**more passes than the limit: a regression of the engine**"
                elif x["value"] <= bar(m):
                    why = "the value is under the bar, its interval crosses it: too few rounds to decide"
                elif load == "contaminated":
                    why = ("the limit's passes, on a loaded machine: **load** until a quiet run (or `benchmarks/"
                           "compare_commits.py --rounds`, interleaved against an earlier commit) says otherwise")
                else:
                    why = ("the limit's passes on a machine not descheduled: time outside the passes (arithmetic, "
                           "machinery: the Lightning *added* column); `benchmarks/compare_commits.py --count` against "
                           "an earlier commit shows what changed")
                out.append(f"* {res['model']}, {METHODS[m]['label']}, {path}: X {_x(x)} (limit {limit:.2f}, bar "
                           f"{bar(m):.2f}); extra "
                           f"passes fwd / bwd {passes}{flops}; load {load}: {why}.")
    return out


def _design(a: Dict[str, Any]) -> str:
    """How the steps were ordered (the command's ``--design``)."""
    if a.get("design", "blocks") == "paired":
        return (f"Design `paired` (`benchmarks/cost/paired.py`): `{a['rounds']}` rounds; in each, per method (the "
                f"methods' order rotated by one each round), `{a['steps']}` loop cycles of one step of every variant it "
                "needs (fwd_bwd, plain, baseline, ours; the order rotated by one each cycle) and one fit of a fresh "
                f"`Trainer` whose callback attacks every other step (2 untimed steps, then `{a['steps']}` adjacent "
                "pairs: plain, attacked).")
    return (f"Design `blocks`: rounds `{a['rounds']}`, interleaved (every variant once per round, the order rotated by "
            f"one each round); per round a loop variant runs {a['block_warmup']} untimed + `{a['steps']}` timed steps, "
            f"a Lightning variant one fit of a fresh `Trainer` ({a['lightning_warmup']} untimed + `{a['steps']}` timed "
            "steps).")


def _x_words(a: Dict[str, Any]) -> str:
    """How X and its spread are computed, by design."""
    if a.get("design", "blocks") == "paired":
        return ("X_c is computed within each cycle from its own steps, seconds apart; **X is the median of X_c over "
                "the cycles** (rounds × steps), [brackets]: 90% bootstrap interval of that median (cycles resampled), "
                "*IQR*: interquartile range of X_c. *Lightning*: X_c from a pair of adjacent steps of one fit, the plain "
                "one as T_plain and its own forward + backward (phase timer) as the unit. Differences (*ours − "
                "baseline*, *Lightning − loop*) are paired within cycles.")
    return ("Per round, each T is the median of the variant's timed steps and X_r is computed within the round; **X is "
            "the median of X_r over the rounds**, [brackets]: 90% bootstrap interval of that median (rounds "
            "resampled), *IQR*: interquartile range of X_r. Differences (*ours − baseline*, *Lightning − loop*) are "
            "paired within rounds. *Lightning* uses the plain Lightning step as T_plain.")


def render(results: Dict[str, Any]) -> str:
    mach, a = results["machine"], results["args"]
    methods: List[str] = a["method_list"]
    lightning = not a["no_lightning"]
    clock = a["clock"]
    other = "wall" if clock == "cpu" else "cpu"
    kwargs = "; ".join(f"{short(m)} {METHODS[m]['kw']}" for m in methods)
    lines = [
        "# Attack cost and memory: lightning_adv vs the reference snippets", "",
        f"Command: `{results['command']}`", "",
        f"Machine: {mach.get('cpu_model') or mach['processor']}, {mach['cpu_count']} cores (torch threads "
        f"{mach['torch_threads']}), {mach['platform']}; Python {mach['python']}, torch {mach['torch']}, lightning "
        f"{mach.get('lightning', '?')}, transformers {mach.get('transformers', '?')}"
        + (f"; GPU {mach['gpu']}" if mach.get("gpu") else "") + ".", "",
        f"Host allocator (`--malloc {a.get('malloc', 'system')}`): {results.get('malloc', allocator.DESCRIPTIONS['system'])}.", "",
        f"Device `{a['device']}`, precision `{a['precision']}`, AdamW (lr {LR}); {kwargs}. " + _design(a) + " Ours in the loop: "
        "`method.attack_backward(closure, backward)` after the clean backward (FGM, AWP, PGD, SAM), "
        "`lightning_adv.adversarial_backward(model, [method], loss_fn, backward)` for the whole micro-batch (FreeLB, "
        "R3F, R-Drop, SMART, VAT, Momentum-SAM on the loop's AdamW, NEFTune; the snippets run the whole micro-batch too). "
        "Baselines (`benchmarks/reference_snippets.py`): SAM is davda54/sam's `first_step`/`second_step` around the "
        "pass; Momentum-SAM is MarlonBecker/MSAM's `AdamW_MSAM` optimizer in place of AdamW (the stored weights stay "
        "at the ascent point between steps; its decoupled weight decay after the update, as in the source); NEFTune "
        "is transformers' `neftune_post_forward_hook` on the input embedding (registered around each step). Public "
        "API only (`benchmarks/cost/__init__.py`).",
        "",
        "## Load",
        "",
        "Whether the machine was ours while the rounds ran (`benchmarks/cost/clocks.py`): *waited*: the share of the "
        "timed wall time the measuring thread spent runnable but off the CPU (`/proc/thread-self/schedstat`); "
        f"*wall/cpu > {clocks.RATIO_LIMIT}*: the share of timed steps stretched by descheduling; *others*: CPU used by "
        "other processes meanwhile, in cores (`/proc/stat` minus ours); *steal*: CPU taken by the host. *contaminated*: "
        f"waited > {100 * clocks.WAIT_LIMIT:.0f}%, or > {100 * clocks.OVER_LIMIT:.0f}% of the steps stretched, or steal > "
        f"{100 * clocks.STEAL_LIMIT:.0f}%: wall-time X are unreliable and CPU-time X must be confirmed on a quiet machine; "
        f"*shared*: others > {clocks.OTHERS_LIMIT} cores without descheduling (shared caches and memory bandwidth: "
        "CPU-time X hold to first order); *quiet*: neither. CPU time leaves out the time spent descheduled, which "
        "makes X from it much less sensitive to load than X from wall time; shared caches, memory bandwidth and "
        "steal still reach it."
        + (" On CUDA the host waits for the device, which the detector counts as time off the CPU: read it as a "
           "statement about the host only." if a["device"] != "cpu" else ""),
        "",
    ]
    rows = []
    for res in results["models"]:
        ld = res["load"]
        rows.append([
            res["model"], f"**{ld['verdict']}**" + (f" ({'; '.join(ld['reasons'])})" if ld["reasons"] else ""),
            f"{ld['loadavg_before'][0]:.2f} → {ld['loadavg_after'][0]:.2f}",
            f"{ld.get('others_cores', float('nan')):.2f}", f"{100 * ld['wait_fraction']:.1f}%",
            f"{100 * ld['steps_over']:.0f}%", f"{ld['ratio_median']:.3f} ({ld['ratio_max']:.2f})",
            f"{100 * ld.get('steal', 0.0):.1f}%", f"{len(res['clean_rounds'])} / {res['rounds']}", f"{res['seconds']:.0f}",
        ])
    lines += _table(["model", "verdict", "load avg (1 min) before → after", "others (cores)", "waited",
                     f"steps wall/cpu > {clocks.RATIO_LIMIT}", "wall/cpu median (max)", "steal", "clean rounds", "s"], rows)

    def x_rows(c: str, bold: bool) -> List[List[Any]]:
        rows = []
        for res in results["models"]:
            f = res["median_ms"][c]["fwd_bwd"]
            for m in methods:
                x, cnt = res["X"][c][m], res["counts"].get(f"ours_{m}")
                ours = _x(x["ours"])
                row = [f"{res['model']} ({res['batch']}×{res['seq']})", METHODS[m]["label"], f"{METHODS[m]['limit']:.2f}",
                       f"{bar(m):.2f}", f"{f:.1f}", f"{cnt['forwards'] - 1} / {cnt['backwards'] - 1}" if cnt else "–",
                       f"{res['X_flops'][f'ours_{m}']:.2f}" if res["X_flops"] else "–",
                       f"**{ours}**" if bold else ours, _iqr(x["ours"]), _x(x.get("ref")), _x(x.get("ours_minus_ref"), True)]
                if lightning:
                    row += [_x(x.get("lightning")), _x(x.get("lightning_minus_loop"), True)]
                row.append(verdict(x["ours"], m) + (" / " + verdict(x["lightning"], m) if lightning else ""))
                rows.append(row)
        return rows

    head = ["model", "method", "limit", "bar", "T_fwd+bwd (ms)", "extra passes ours, fwd / bwd", "X by FLOPs",
            "X ours (loop) [90%]", "IQR", "X baseline", "ours − baseline"]
    head += ["X ours (Lightning)", "Lightning − loop"] if lightning else []
    head += ["≤ bar: loop" + (" / Lightning" if lightning else "")]
    lines += [
        "", f"## X by {CLOCK_WORDS[clock]}", "",
        "**X = (T_attack − T_plain) / T_fwd+bwd**, the extra cost of the attack in units of one forward+backward "
        "(no optimizer step) of the same batch; *limit*: the number of adversarial passes. " + _x_words(a) + " Load-free columns (`benchmarks/cost/opcount.py`): *extra passes*: model forwards "
        "and backward traversals beyond the clean one, counted in one step; *X by FLOPs*: the same ratio with "
        "matrix-multiply FLOPs instead of times, the compute floor. *bar*: the limit plus the issue's tolerance "
        f"({_tolerances(methods)}). Last column: *yes* when the whole interval is at or under the bar, *no* when it "
        "is all above, else *undecided*.",
        "",
    ] + _table(head, x_rows(clock, True))
    lines += ["", f"The same by {CLOCK_WORDS[other]}:", ""] + _table(head, x_rows(other, False))
    clean = [(res["model"], res["X_wall_clean"]) for res in results["models"] if res.get("X_wall_clean")]
    if clean:
        lines += ["", "Wall-clock X over the clean rounds only (no timed step stretched by descheduling):", ""]
        lines += _table(["model", "method", "X ours (loop)", "X ours (Lightning)"],
                        [[name, METHODS[m]["label"], _x(xc[m]["ours"]), _x(xc[m].get("lightning"))]
                         for name, xc in clean for m in methods])

    lines += ["", "## Diagnosis", "", f"Every X whose interval is not all at or under its bar ({_tolerances(methods)}; by {clock} time), "
              "with what tells load from a regression: the passes counted in one step (load-free), X by FLOPs, and the "
              "run's load verdict.", ""]
    lines += diagnose(results, clock) or ["None: every X is at or under its bar."]

    # times and load-free counts
    lines += ["", "## Times and counts per step", "",
              f"Median time per step ({clock}, ms; all timed steps) and minor page faults per step (*faults*, "
              "`getrusage`: pages mapped on first touch, which the host allocator decides), and the load-free counts "
              "of one step: model "
              "forwards, backward traversals (to the logits; *full*: to the word-embedding weight), matrix-multiply GFLOP, "
              "ATen operators, MiB written by them, `_foreach_*` calls, MiB written by copies, Python calls inside "
              "`lightning_adv`:", ""]
    rows = []
    for res in results["models"]:
        for v, ms in res["median_ms"][clock].items():
            c = res["counts"].get(v)
            faults = res.get("median_faults", {}).get(v)
            rows.append([res["model"], v, f"{ms:.1f}", "–" if faults is None else f"{faults:.0f}"] + (
                [c["forwards"], f"{c['backwards']} ({c['weight_backwards']})", f"{c['flops'] / 1e9:.2f}", c["ops"],
                 f"{c['bytes'] / 2**20:.1f}", c["foreach"], f"{c['copies'] / 2**20:.1f}", c["py_calls"]] if c else ["–"] * 8))
    lines += _table(["model", "variant", "ms", "faults", "forwards", "backwards (full)", "GFLOP", "ops", "MiB written", "foreach",
                     "MiB copied", "Python calls"], rows)
    arith = [(res, m) for res in results["models"] for m in methods if f"ours_{m}" in res["arithmetic_ms"]]
    if arith:
        lines += ["", f"The attack's own arithmetic timed alone ({'CPU' if a['device'] == 'cpu' else 'wall'} ms; `attack_backward` with a loss closure that "
                  "returns a constant and a backward that does nothing, from a copy of the clean gradient), baseline / "
                  "ours, and in units of T_fwd+bwd:", ""]
        lines += _table(["model", "method", "baseline / ours (ms)", "units"], [
            [res["model"], METHODS[m]["label"],
             f"{res['arithmetic_ms'].get(f'ref_{m}', float('nan')):.1f} / {res['arithmetic_ms'][f'ours_{m}']:.1f}",
             f"{res['arithmetic_ms'].get(f'ref_{m}', float('nan')) / res['median_ms'][clock]['fwd_bwd']:.3f} / "
             f"{res['arithmetic_ms'][f'ours_{m}'] / res['median_ms'][clock]['fwd_bwd']:.3f}"] for res, m in arith])

    if lightning:
        lines += ["", "## Lightning, per step, by public hooks", "",
                  f"Median ms ({clock}) and calls per step (`benchmarks/cost/lightning_runner.py`): the module's "
                  "`training_step` and `LightningModule.backward` outside / inside an adversarial pass "
                  "(`in_adversarial_pass`), *update*: from `on_before_optimizer_step` to the end of the step, *other*: "
                  "the rest (Lightning's loop; the callback's arithmetic and bookkeeping; SMART's ascent gradient), "
                  "*added*: other minus the plain fit's other.", ""]
        rows = []
        for res in results["models"]:
            for v, ph in res["phases_ms"][clock].items():
                rows.append([res["model"], v, f"{ph['total']:.1f}", f"{ph['forward']:.1f} ({ph['forward_calls']:.0f})",
                             f"{ph['backward']:.1f} ({ph['backward_calls']:.0f})",
                             f"{ph['adv_forward']:.1f} ({ph['adv_forward_calls']:.0f})",
                             f"{ph['adv_backward']:.1f} ({ph['adv_backward_calls']:.0f})", f"{ph['update']:.1f}",
                             f"{ph['other']:.1f}", f"{ph.get('added', float('nan')):+.1f}"])
        lines += _table(["model", "variant", "total", "forward (calls)", "backward (calls)", "adv. forward (calls)",
                         "adv. backward (calls)", "update", "other", "added"], rows)

    # memory
    lines += ["", "## Memory", "",
              "Saved state: the largest number of bytes held by the method's saved copies inside the adversarial closure "
              "and backward (ours: `method.saved_bytes()`; baseline: the snippet's backups), (×) in copies of the "
              "perturbed parameters; FreeLB, R3F, SMART, VAT and NEFTune save no copy and keep δ [batch, tokens, hidden] "
              "(`method.target.delta`; R3F, NEFTune: the noise; the NEFTune baseline's noise is as large); Momentum-SAM "
              "exposes no saved state (its peak memory is in the peak-memory runs; the baseline keeps no copy: its "
              "stored weights stay moved); R-Drop perturbs nothing (a second dropout mask) and saves nothing:", ""]
    rows = []
    for res in results["models"]:
        for m in methods:
            s = res["saved"][m]
            if m in PARAMETER_METHODS:
                rows.append([res["model"], METHODS[m]["label"], f"{_mib(s['ours'])} ({s['ours'] / s['perturbed']:.2f}×)",
                             f"{_mib(s['ref'])} ({s['ref'] / s['perturbed']:.2f}×)"])
            elif m == "rdrop":  # nothing perturbed, nothing saved: the second pass's activations (peak memory)
                rows.append([res["model"], METHODS[m]["label"], "none", "none"])
            elif s.get("delta") is None:
                rows.append([res["model"], METHODS[m]["label"], "not exposed (see peak memory)", "none"])
            else:
                rows.append([res["model"], METHODS[m]["label"], f"none (δ {_mib(s['delta'])})", f"none (δ {_mib(s['delta'])})"])
    lines += _table(["model", "method", "ours", "baseline"], rows)
    for res in results["models"]:
        pk = res.get("cuda_peaks")
        if pk:
            wb = res["params"] * 4
            lines += ["", f"Peak GPU memory above plain (`torch.cuda.max_memory_allocated`, {a['peak_steps']} steps), "
                      f"{res['model']}, baseline / ours (in weight copies):", ""]
            lines += _table(["method", "baseline", "ours"], [
                [METHODS[m]["label"], f"+{_mib(pk[f'ref_{m}'] - pk['plain'])} ({(pk[f'ref_{m}'] - pk['plain']) / wb:.2f})",
                 f"+{_mib(pk[f'ours_{m}'] - pk['plain'])} ({(pk[f'ours_{m}'] - pk['plain']) / wb:.2f})"] for m in methods], left=1)
    peaks = results.get("peaks")
    if peaks:
        def peak(p: Dict[str, Any]) -> int:
            return p["peak_kib"] or p["maxrss_kib"]

        plain = peak(peaks["plain"]) if "plain" in peaks else None
        any_peak = next(iter(peaks.values()))
        spec = MODELS[a["peak_model"]]
        lines += ["", f"Peak resident memory (VmHWM reset after the model is built), one subprocess per variant, "
                  f"{a['peak_steps']} AdamW steps of the random `{a['peak_model']}` BERT ({any_peak['params'] / 1e6:.0f}M "
                  f"parameters, {_mib(any_peak['weight_bytes'])}), batch {spec['batch']}×{spec['seq']}:", ""]
        lines += _table(["variant", "resident before", "peak", "− plain", "− plain, weight copies"], [
            [v, _mib((p.get("rss_before_kib") or 0) * 1024), _mib(peak(p) * 1024),
             _mib((peak(p) - plain) * 1024) if plain is not None else "–",
             f"{(peak(p) - plain) * 1024 / p['weight_bytes']:.2f}" if plain is not None else "–"] for v, p in peaks.items()], left=1)

    syncs = [(res["model"], res["syncs"]) for res in results["models"] if res["syncs"].get("loop")]
    if syncs:
        lines += ["", "Host-device synchronisations per step inside the attack (loss closure and backward excluded), "
                  "baseline / ours, and ours under `set_sync_debug_mode(\"error\")`; Lightning: per step, forward and "
                  "backward excluded:", ""]
        lines += _table(["model", "method", "baseline / ours", "error mode", "Lightning plain / callback"], [
            [name, METHODS[m]["label"], f"{s['loop'].get(f'ref_{m}', '–')} / {s['loop'][f'ours_{m}']}",
             s["loop"][f"ours_{m}_error_mode"],
             f"{s['lightning'].get('L_plain', float('nan')):.1f} / {s['lightning'].get(f'L_{m}', float('nan')):.1f}"
             if s.get("lightning") else "–"] for name, s in syncs for m in methods])
    return "\n".join(lines) + "\n"


def write_report(path: str, text: str) -> None:
    """Write ``text``, keeping a hand-written ``## Notes`` section of an existing file at its end."""
    notes = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        i = old.find("\n## Notes")
        if i >= 0:
            notes = old[i:]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text + notes)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    quiet()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    malloc = allocator.configure(args.malloc)  # before the models are built
    clocks.one_thread(args.threads if args.threads else (1 if args.device == "cpu" else None))
    if args.clock is None:
        args.clock = "cpu" if args.device == "cpu" and torch.get_num_threads() == 1 else "wall"
    command = "python benchmarks/attack_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    texts, everything = [], []
    precisions = args.precision.split(",")
    for precision in precisions:
        args.precision = precision
        opts = Options(methods=args.method_list, rounds=args.rounds, steps=args.steps, warmup=args.warmup,
                       block_warmup=args.block_warmup, lightning_warmup=args.lightning_warmup, batch=args.batch,
                       seq=args.seq, device=args.device, precision=precision, lightning=not args.no_lightning,
                       count=not args.no_count, peak_steps=args.peak_steps, verbose=args.verbose, design=args.design)
        results: Dict[str, Any] = dict(machine=machine(), args=dict(vars(args)), command=command, malloc=malloc,
                                       models=[])
        for name in [m for m in args.models.split(",") if m and m != "none"]:
            if args.verbose:
                print(f"measuring {name} ({precision}) ...", flush=True)
            results["models"].append(measure_model(name, opts))
        if args.peak_model != "none":
            results["peaks"] = measure_peaks(args.peak_methods.split(","), args.peak_model, args.peak_steps,
                                             args.device, precision, args.verbose)
        text = render(results)
        if len(precisions) > 1:
            text = f"## Precision `{precision}`\n\n" + text.replace("# Attack cost", "### Attack cost", 1).replace("\n## ", "\n#### ")
        print(text, flush=True)
        texts.append(text)
        everything.append(results)
        if args.out:  # after every precision: a partial report survives an interrupted run
            write_report(args.out, "\n".join(texts))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(everything if len(precisions) > 1 else results, f, indent=1, default=str)
    return everything[-1] if len(everything) == 1 else dict(precisions=everything)


if __name__ == "__main__":
    main()
