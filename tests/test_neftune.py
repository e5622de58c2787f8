"""NEFTuneCallback: equal to transformers' hook in float64, training only, never twice, PEFT/LoRA, refusals. DDP and
FSDP: tests/test_ddp.py and tests/test_fsdp.py (configurations ``neftune_*``)."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from torch.nn import functional as F

from lightning_adv import NEFTuneCallback
from helpers import TextModule, loader, make_data, max_diff, trainer

EMB = "model.embeddings.word_embeddings"


class Seeded(L.Callback):
    """Gives the method a generator seeded by the batch index; the reference seeds the global state the same way."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for cb in trainer.callbacks:
            method = getattr(cb, "method", None)
            if method is not None and hasattr(method, "generator"):
                method.generator = torch.Generator().manual_seed(1000 * trainer.current_epoch + batch_idx)


def test_callback_equals_transformers_hook_float64():
    from transformers.integrations.neftune import neftune_post_forward_hook

    ours, ref = TextModule(dtype=torch.float64), TextModule(dtype=torch.float64)
    cb = NEFTuneCallback(noise_alpha=5.0, embedding=EMB)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the hook computes its magnitude in the default dtype
    try:
        trainer(max_epochs=2, callbacks=[cb, Seeded()], precision="64-true").fit(ours, loader(make_data(16)))
        emb = ref.model.embeddings.word_embeddings
        emb.neftune_noise_alpha = 5.0
        emb.register_forward_hook(neftune_post_forward_hook)
        opt = ref.configure_optimizers()
        for epoch in range(2):
            for i, (ids, y) in enumerate(loader(make_data(16))):
                torch.manual_seed(1000 * epoch + i)
                F.cross_entropy(ref.model(ids), y).backward()
                opt.step()
                opt.zero_grad()
    finally:
        torch.set_default_dtype(previous)
    assert cb.attacks == 8
    assert max_diff(ours.model, ref.model) < 1e-9
    plain = TextModule(dtype=torch.float64)
    trainer(max_epochs=2, precision="64-true").fit(plain, loader(make_data(16)))
    assert max_diff(ours.model, plain.model) > 1e-4


class Validates(TextModule):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        assert not self.model.embeddings.word_embeddings._forward_hooks  # no noise outside the training step
        self.log("val_loss", F.cross_entropy(self.model(batch[0]), batch[1]))


def test_no_noise_at_validation_and_no_hook_after_fit():
    module = Validates()
    t = trainer(max_epochs=2, callbacks=[NEFTuneCallback(embedding=EMB)], limit_val_batches=2)
    t.fit(module, loader(make_data(16)), loader(make_data(8)))
    assert "val_loss" in t.callback_metrics
    assert not module.model.embeddings.word_embeddings._forward_hooks


def test_transformers_hook_already_there_is_refused():
    from transformers.integrations.neftune import neftune_post_forward_hook

    module = TextModule()
    emb = module.model.embeddings.word_embeddings
    emb.neftune_noise_alpha = 5.0
    emb.register_forward_hook(neftune_post_forward_hook)
    with pytest.raises(ValueError, match=r"already carries transformers' NEFTune hook.*added twice"):
        trainer(max_steps=1, callbacks=[NEFTuneCallback(embedding=EMB)]).fit(module, loader(make_data(8)))


def test_range_errors():
    with pytest.raises(ValueError, match=r"noise_alpha must be a finite number >= 0"):
        NEFTuneCallback(noise_alpha=-1.0)
    with pytest.raises(ValueError, match=r"length must be one of 'padded', 'tokens'"):
        NEFTuneCallback(length="real")


def test_lora_gpt2_with_neftune_trains_adapters_and_leaves_the_embedding():
    peft = pytest.importorskip("peft")
    import transformers

    class LoRA(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            base = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2,
                                                                       n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
                                                                       attn_pdrop=0.0))
            self.model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["c_attn"], lora_dropout=0.0))
            self.model.train()

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

    data = torch.utils.data.DataLoader(torch.randint(0, 50, (8, 10)), batch_size=4)
    noisy, plain = LoRA(), LoRA()
    embedding = noisy.model.get_input_embeddings().weight.detach().clone()
    cb = NEFTuneCallback(noise_alpha=15.0)
    trainer(max_epochs=1, callbacks=[cb]).fit(noisy, data)
    trainer(max_epochs=1).fit(plain, data)
    assert cb.attacks == 2
    assert torch.equal(noisy.model.get_input_embeddings().weight.detach(), embedding)  # frozen, untouched
    lora = [n for n, p in noisy.named_parameters() if "lora_" in n]
    assert lora and max_diff(noisy.model, plain.model) > 0  # the noise changed what the adapters learned


def test_composition_rules():
    """NEFTune's noise is on the clean forward only: methods with passes of their own are refused; Momentum-SAM runs."""
    from lightning_adv import FreeLBCallback, FGMCallback, MomentumSAMCallback, R3FCallback

    for other in (FreeLBCallback(embedding=EMB), FGMCallback(), R3FCallback(embedding=EMB)):
        with pytest.raises(ValueError, match=r"NEFTune with \w+ is not supported: NEFTune's noise is on the clean forward"):
            trainer(max_steps=1, callbacks=[NEFTuneCallback(embedding=EMB), other]).fit(TextModule(), loader(make_data(8)))
    both = [NEFTuneCallback(embedding=EMB), MomentumSAMCallback(rho=0.1)]
    trainer(max_steps=3, callbacks=both).fit(TextModule(), loader(make_data(16)))
    assert [cb.attacks for cb in both] == [3, 3]
