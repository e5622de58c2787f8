"""Causal LM (tiny GPT-2 and Llama from configs, labels with -100, padding left or right): R3F and SMART with a
token-level divergence, equal in float64 to plain loops written from the per-token definition; FreeLB and NEFTune
change training; RobustAccuracy per token, equal to a hand computation; masked positions have no influence."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.nn import functional as F

from lightning_adv.core import NEFTune, R3F, SMART, FreeLB, adversarial_backward
from lightning_adv.core.robust import robust_accuracy
from lightning_adv.core.smoothness import token_mask

transformers = pytest.importorskip("transformers")

VOCAB, PAD, B, T = 40, 0, 3, 8


def build(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32, pad_token_id=PAD,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                          pad_token_id=PAD)
        model = transformers.LlamaForCausalLM(config)
    return model.double().train()


def make_batch(side: str, seed: int = 0):
    """Ids padded on ``side`` with PAD (attention mask 0), labels = ids with -100 on the padding and on the first
    two (prompt) tokens of each example."""
    g = torch.Generator().manual_seed(seed)
    lengths = [8, 5, 6]
    ids = torch.full((B, T), PAD)
    attention = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100)
    for i, n in enumerate(lengths):
        tokens = torch.randint(1, VOCAB, (n,), generator=g)
        where = slice(0, n) if side == "right" else slice(T - n, T)
        ids[i, where], attention[i, where] = tokens, 1
        lab = tokens.clone()
        lab[:2] = -100
        labels[i, where] = lab
    return ids, attention, labels


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a, b, atol=1e-12):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=0, atol=atol), (n, float((a[n] - b[n]).abs().max()))


def ours(model, method, ids, attention, labels):
    def loss_fn():
        out = model(input_ids=ids, attention_mask=attention, labels=labels)
        return {"loss": out.loss, "logits": out.logits, "labels": labels}

    model.zero_grad()
    (outcome,) = adversarial_backward(model, [method], loss_fn)
    return outcome, grads(model)


def selected(logits, labels):
    """The logits of the positions that predict a label, [N, V]: position t predicts labels[:, t + 1]."""
    return logits[:, :-1][labels[:, 1:] != -100]


def sym_kl_per_token(p_logits, q_logits):
    """KL(p||q) + KL(q||p) summed over the vocabulary, averaged over the rows (tokens)."""
    lp, lq = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    return ((lp.exp() * (lp - lq)).sum(-1) + (lq.exp() * (lq - lp)).sum(-1)).mean()


def reference_r3f(model, ids, attention, labels, eps, lam, seed):
    model.zero_grad()
    emb = model.get_input_embeddings()
    clean = model(input_ids=ids, attention_mask=attention, labels=labels)
    real = (ids != PAD).unsqueeze(-1).double()
    noise = torch.empty(B, T, emb.embedding_dim, dtype=torch.float64).uniform_(-eps, eps, generator=torch.Generator().manual_seed(seed))
    noised = model(inputs_embeds=emb(ids).detach() + noise * real, attention_mask=attention).logits
    kl = sym_kl_per_token(selected(noised, labels), selected(clean.logits, labels))
    (clean.loss + lam * kl).backward()
    return kl.detach(), grads(model)


def stable_kl(logit, target, epsilon=1e-6):
    p, y = F.softmax(logit, -1), F.softmax(target, -1)
    rp = -(1.0 / (p + epsilon) - 1 + epsilon).detach().log()
    ry = -(1.0 / (y + epsilon) - 1 + epsilon).detach().log()
    return (p * (rp - ry) * 2).sum()


def reference_smart(model, ids, attention, labels, alpha, step_size, noise_var, seed, steps=1, epsilon=1e-6):
    model.zero_grad()
    emb = model.get_input_embeddings()
    clean = model(input_ids=ids, attention_mask=attention, labels=labels)
    real = (ids != PAD).unsqueeze(-1).double()
    g = torch.Generator().manual_seed(seed)
    delta = (torch.empty(B, T, emb.embedding_dim, dtype=torch.float64).normal_(0, 1, generator=g) * noise_var * real).requires_grad_()
    for _ in range(steps):
        adv = model(inputs_embeds=emb(ids) + delta, attention_mask=attention).logits
        (grad,) = torch.autograd.grad(stable_kl(selected(adv, labels), selected(clean.logits, labels).detach()), delta)
        d = delta.detach() + grad * step_size
        delta = (d / (d.abs().amax(-1, keepdim=True) + epsilon)).requires_grad_()
    adv = selected(model(inputs_embeds=emb(ids) + delta, attention_mask=attention).logits, labels)
    c = selected(clean.logits, labels)
    # mt-dnn SymKlCriterion per token: each KL differentiates its log side only, mean over the tokens
    kl = (F.kl_div(F.log_softmax(c, -1), F.softmax(adv.detach(), -1), reduction="sum")
          + F.kl_div(F.log_softmax(adv, -1), F.softmax(c.detach(), -1), reduction="sum")) / c.shape[0]
    (clean.loss + alpha * kl).backward()
    return kl.detach(), grads(model)


ARCHS = ["gpt2", "llama"]
SIDES = ["right", "left"]


def test_token_mask_is_shifted_as_transformers():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 3, 4, 5, 6]])
    assert token_mask(torch.zeros(2, 5, 7), labels).tolist() == [
        [False, True, True, False, False], [True, True, True, True, False]]
    assert token_mask(torch.zeros(2, 7), labels[:, 0]) is None  # sequence classification: unchanged


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("arch", ARCHS)
def test_r3f_per_token_equals_reference_in_float64(arch, side):
    model = build(arch)
    ids, attention, labels = make_batch(side)
    method = R3F(model, eps=0.5, r3f_lambda=0.7, generator=torch.Generator().manual_seed(3))
    outcome, got = ours(model, method, ids, attention, labels)
    kl, want = reference_r3f(model, ids, attention, labels, 0.5, 0.7, seed=3)
    assert float(kl) > 1e-6
    assert torch.allclose(outcome.loss, kl, rtol=0, atol=1e-12)
    assert_same_grads(got, want)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("arch", ARCHS)
def test_smart_per_token_equals_reference_in_float64(arch, side):
    model = build(arch)
    ids, attention, labels = make_batch(side)
    method = SMART(model, adv_alpha=2.0, step_size=1e-2, noise_var=1e-2, steps=2, generator=torch.Generator().manual_seed(4))
    outcome, got = ours(model, method, ids, attention, labels)
    kl, want = reference_smart(model, ids, attention, labels, 2.0, 1e-2, 1e-2, seed=4, steps=2)
    assert float(kl) > 1e-8
    assert torch.allclose(outcome.loss, kl, rtol=0, atol=1e-12)
    assert_same_grads(got, want)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("make", [
    lambda m: R3F(m, eps=0.5, generator=torch.Generator().manual_seed(1)),
    lambda m: SMART(m, step_size=1e-2, noise_var=1e-2, generator=torch.Generator().manual_seed(1)),
], ids=["r3f", "smart"])
def test_masked_positions_have_no_influence(make, side):
    model = build("gpt2")
    ids, attention, labels = make_batch(side)
    first, g1 = ours(model, make(model), ids, attention, labels)
    other = ids.clone()
    other[attention == 0] = 7  # other tokens at the padding (attention mask 0, label -100)
    second, g2 = ours(model, make(model), other, attention, labels)
    assert torch.allclose(first.loss, second.loss, rtol=0, atol=1e-12)
    # the divergence ignores the logits at positions that predict no label
    from lightning_adv.core.smoothness import select_tokens, symmetric_kl
    z = torch.randn(B, T, VOCAB, dtype=torch.float64)
    w = z + torch.randn(B, T, VOCAB, dtype=torch.float64)
    mask = token_mask(z, labels)
    w2 = w.clone()
    w2[~mask] = 100.0
    assert torch.equal(symmetric_kl(select_tokens(w, mask), select_tokens(z, mask)), symmetric_kl(select_tokens(w2, mask), select_tokens(z, mask)))


def test_classification_logits_unchanged_by_labels_key():
    """[B, C] logits with labels [B]: the divergence is the batch mean as before."""
    from lightning_adv.core.passes import pass_output
    out = pass_output({"loss": torch.zeros(()), "logits": torch.zeros(4, 2), "labels": torch.zeros(4, dtype=torch.long)})
    assert token_mask(out.logits, out.labels) is None


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["freelb", "neftune"])
def test_freelb_and_neftune_change_training(arch, kind):
    model = build(arch)
    ids, attention, labels = make_batch("left")
    model.zero_grad()
    model(input_ids=ids, attention_mask=attention, labels=labels).loss.backward()
    plain = grads(model)
    if kind == "freelb":
        method = FreeLB(model, adv_lr=0.1, adv_steps=2, adv_init_mag=0.1, generator=torch.Generator().manual_seed(0))
    else:
        method = NEFTune(model, noise_alpha=5.0, length="tokens", generator=torch.Generator().manual_seed(0))
    model.zero_grad()
    (outcome,) = adversarial_backward(model, [method], lambda: model(input_ids=ids, attention_mask=attention, labels=labels).loss)
    assert not bool(outcome.skipped)
    got = grads(model)
    assert got.keys() == plain.keys()
    assert max(float((got[n] - plain[n]).abs().max()) for n in got) > 1e-6
    assert all(torch.isfinite(v).all() for v in got.values())


def hand_robust(model, ids, attention, labels, epsilon):
    """FGM l2 per example on the embedding output, the loss the token CE summed over the labelled tokens."""
    emb = model.get_input_embeddings()
    real = (ids != PAD).unsqueeze(-1).double()
    e = emb(ids).detach()
    delta = torch.zeros_like(e, requires_grad=True)
    logits = model(inputs_embeds=e + delta, attention_mask=attention).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    (g,) = torch.autograd.grad(loss, delta)
    g = g * real
    delta = epsilon * g / g.flatten(1).norm(dim=1).view(-1, 1, 1)
    with torch.no_grad():
        adv = model(inputs_embeds=e + delta, attention_mask=attention).logits
    keep = labels[:, 1:] != -100
    y = labels[:, 1:][keep]
    clean_sel, adv_sel = logits.detach()[:, :-1][keep], adv[:, :-1][keep]
    acc = (adv_sel.argmax(-1) == y).double()
    gain = F.cross_entropy(adv_sel, y, reduction="none") - F.cross_entropy(clean_sel, y, reduction="none")
    return acc, gain, (clean_sel.argmax(-1) == y).double()


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("arch", ARCHS)
def test_robust_accuracy_per_token_equals_hand_computation(arch, side):
    model = build(arch).eval()
    batches = [make_batch(side, seed) for seed in (0, 1)]
    epsilon = 2.0
    metrics = robust_accuracy(model, lambda b: (model(input_ids=b[0], attention_mask=b[1]).logits, b[2]), batches, epsilon=[epsilon])
    parts = [hand_robust(model, *b, epsilon) for b in batches]
    acc = torch.cat([p[0] for p in parts])
    gain = torch.cat([p[1] for p in parts])
    clean = torch.cat([p[2] for p in parts])
    assert acc.numel() == sum(int((b[2][:, 1:] != -100).sum()) for b in batches)  # per token
    assert metrics["robust_acc@2"] == pytest.approx(float(acc.mean()), abs=1e-12)
    assert metrics["robust_loss_gain@2"] == pytest.approx(float(gain.mean()), abs=1e-9)
    assert metrics["clean_acc"] == pytest.approx(float(clean.mean()), abs=1e-12)
    assert metrics["robust_loss_gain@2"] > 0

    # masked positions have no influence: other tokens at the padding give the same numbers
    other = []
    for ids, attention, labels in batches:
        ids = ids.clone()
        ids[attention == 0] = 9
        other.append((ids, attention, labels))
    again = robust_accuracy(model, lambda b: (model(input_ids=b[0], attention_mask=b[1]).logits, b[2]),
                            [(b[0], b[1], b[2]) for b in other], epsilon=[epsilon])
    assert again == pytest.approx(metrics, abs=1e-9)


class LM(L.LightningModule):
    def __init__(self, arch):
        super().__init__()
        self.model = build(arch).eval()

    def robust_forward(self, batch):
        ids, attention, labels = batch
        return self.model(input_ids=ids, attention_mask=attention).logits, labels

    def test_step(self, batch, batch_idx):
        pass


@pytest.mark.parametrize("arch", ARCHS)
def test_robust_accuracy_callback_per_token(arch):
    from lightning_adv.callbacks.robust import RobustAccuracy

    module = LM(arch)
    batches = [make_batch("left", seed) for seed in (0, 1)]
    trainer = L.Trainer(callbacks=[RobustAccuracy(epsilon=2.0, num_classes=VOCAB)], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)  # the batches as they are
    metrics = trainer.test(module, loader, verbose=False)[0]
    acc = torch.cat([hand_robust(module.model, *b, 2.0)[0] for b in batches])
    assert metrics["test_robust_acc@2"] == pytest.approx(float(acc.mean()), abs=1e-6)


@pytest.mark.parametrize("packed", [True, False])
def test_neftune_tokens_length_per_packed_example(packed):
    """Packed rows (position ids restarting at 0, no padding): with length="tokens" each packed example gets
    alpha / sqrt(its own length * d); called without position ids, the row's length counts."""
    model = build("llama")
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3], [0, 1, 2, 0, 1, 2, 3, 4, 5]])
    seen = {}

    def capture(module, args, kwargs):
        seen["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    handle = model.model.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    method = NEFTune(model, noise_alpha=5.0, length="tokens", generator=torch.Generator().manual_seed(5))
    kwargs = {"position_ids": positions} if packed else {}
    try:
        adversarial_backward(model, [method], lambda: model(input_ids=ids, labels=ids, **kwargs).loss)
    finally:
        handle.remove()
    noise = seen["hidden"] - model.get_input_embeddings()(ids).detach()
    uniform = torch.empty(2, 9, 16, dtype=torch.float64).uniform_(-1, 1, generator=torch.Generator().manual_seed(5))
    length = torch.tensor([[5.0] * 5 + [4.0] * 4, [3.0] * 3 + [6.0] * 6], dtype=torch.float64) if packed else torch.full((2, 9), 9.0, dtype=torch.float64)
    expected = uniform * (5.0 / torch.sqrt(length * 16)).unsqueeze(-1)
    assert torch.allclose(noise, expected, rtol=0, atol=1e-12)
    assert method.position_ids is None and not method._pre_hooks  # nothing left on the model
    assert all(not m._forward_pre_hooks for m in model.modules() if hasattr(m, "get_input_embeddings"))


# -- R-Drop per token: the source's pad_mask ----------------------------------------------------------------------------


def build_with_dropout(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32, pad_token_id=PAD,
                                         resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                          pad_token_id=PAD, attention_dropout=0.3)
        model = transformers.LlamaForCausalLM(config)
    return model.double().train()


def reference_rdrop(model, ids, attention, labels, alpha, seed):
    """dropreg/R-Drop on a causal LM: two forwards (the same dropout stream as ours), ``0.5 * (loss1 + loss2) + alpha *
    compute_kl_loss(logits1, logits2, pad_mask)``, pad_mask True where the shifted label is -100 (and the last position),
    written by hand here."""
    model.zero_grad()
    torch.manual_seed(seed)
    out1 = model(input_ids=ids, attention_mask=attention, labels=labels)
    out2 = model(input_ids=ids, attention_mask=attention, labels=labels)
    pad_mask = torch.ones(labels.shape, dtype=torch.bool)
    pad_mask[:, :-1] = labels[:, 1:] == -100
    pad_mask = pad_mask.unsqueeze(-1)
    p_loss = F.kl_div(F.log_softmax(out1.logits, dim=-1), F.softmax(out2.logits, dim=-1), reduction="none")
    q_loss = F.kl_div(F.log_softmax(out2.logits, dim=-1), F.softmax(out1.logits, dim=-1), reduction="none")
    unmasked = (p_loss.sum() + q_loss.sum()) / 2
    kl = (p_loss.masked_fill(pad_mask, 0.0).sum() + q_loss.masked_fill(pad_mask, 0.0).sum()) / 2
    (0.5 * (out1.loss + out2.loss) + alpha * kl).backward()
    return kl.detach(), unmasked.detach(), grads(model)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("arch", ARCHS)
def test_rdrop_per_token_equals_reference_in_float64(arch, side):
    from lightning_adv.core import RDrop

    model = build_with_dropout(arch)
    ids, attention, labels = make_batch(side)
    torch.manual_seed(5)
    outcome, got = ours(model, RDrop(model, alpha=0.8), ids, attention, labels)
    kl, unmasked, want = reference_rdrop(model, ids, attention, labels, 0.8, seed=5)
    assert float(kl) > 1e-6 and float(unmasked - kl) > 1e-6  # dropout on, and the masked positions would count
    assert torch.allclose(outcome.loss, kl, rtol=0, atol=1e-12)
    assert_same_grads(got, want)
