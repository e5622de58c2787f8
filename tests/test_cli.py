"""LightningCLI: the attacks (and RobustAccuracy) enabled purely by flags and YAML, typed and documented."""

from __future__ import annotations

import sys
from typing import Any, List

import lightning as L
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_adv
from lightning_adv import AWPCallback, FGMCallback
from lightning_adv.callbacks.robust import RobustAccuracy

QUIET = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


class CLIModel(L.LightningModule):
    """A tiny text classifier whose embedding is named like a transformer's."""

    def __init__(self, vocab: int = 20, dim: int = 8) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.word_embeddings(ids).mean(1))

    def robust_forward(self, batch: Any) -> Any:
        ids, y = batch
        return self(ids), y

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, y = batch
        return nn.functional.cross_entropy(self(ids), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class CLIData(L.LightningDataModule):
    def __init__(self, n: int = 16, batch_size: int = 4) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randint(0, 20, (n, 5), generator=g), torch.randint(0, 2, (n,), generator=g))
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: Any) -> None:
    """LightningCLI warns when sys.argv holds arguments besides ``args``: pytest's own."""
    monkeypatch.setattr(sys, "argv", ["cli"])


def cli(args: List[str], **kwargs: Any) -> LightningCLI:
    kwargs.setdefault("run", False)
    kwargs.setdefault("save_config_callback", None)
    kwargs.setdefault("seed_everything_default", 0)
    return LightningCLI(CLIModel, CLIData, args=QUIET + args, **kwargs)


def of_type(callbacks: List[Any], cls: type) -> List[Any]:
    return [cb for cb in callbacks if isinstance(cb, cls)]


def test_full_class_path_and_init_arg() -> None:
    c = cli(["--trainer.callbacks+=lightning_adv.FGMCallback", "--trainer.callbacks.epsilon=0.5"])
    (fgm,) = of_type(c.trainer.callbacks, FGMCallback)
    assert (fgm.epsilon, fgm.emb_name, fgm.start_epoch) == (0.5, "word_embeddings", 0)


def test_short_name_after_import() -> None:
    assert lightning_adv.FGMCallback is FGMCallback  # `import lightning_adv` is what registers the short names
    c = cli(["--trainer.callbacks+=FGMCallback", "--trainer.callbacks.epsilon=0.25", "--trainer.callbacks.emb_name=word_emb"])
    (fgm,) = of_type(c.trainer.callbacks, FGMCallback)
    assert (fgm.epsilon, fgm.emb_name) == (0.25, "word_emb")
    c = cli(["--trainer.callbacks+=AWPCallback", "--trainer.callbacks.adv_step=2"])
    (awp,) = of_type(c.trainer.callbacks, AWPCallback)
    assert (awp.adv_step, awp.adv_lr, awp.adv_eps, awp.adv_param) == (2, 1.0, 0.2, "weight")


def test_several_callbacks_each_with_its_own_arguments() -> None:
    c = cli(
        [
            "--trainer.callbacks+=FGMCallback",
            "--trainer.callbacks.epsilon=0.3",
            "--trainer.callbacks.start_epoch=1",
            "--trainer.callbacks+=lightning_adv.AWPCallback",
            "--trainer.callbacks.adv_lr=0.5",
            "--trainer.callbacks.adv_eps=0.01",
            "--trainer.callbacks+=RobustAccuracy",
            "--trainer.callbacks.epsilon=2.0",
        ]
    )
    kinds = [type(cb) for cb in c.trainer.callbacks if isinstance(cb, (FGMCallback, AWPCallback, RobustAccuracy))]
    assert kinds == [FGMCallback, AWPCallback, RobustAccuracy]
    (fgm,), (awp,), (robust,) = (of_type(c.trainer.callbacks, k) for k in kinds)
    assert (fgm.epsilon, fgm.start_epoch) == (0.3, 1)
    assert (awp.adv_lr, awp.adv_eps, awp.adv_step, awp.start_epoch) == (0.5, 0.01, 1, 0)
    assert (robust.epsilon, robust.embedding, robust.num_classes) == (2.0, None, 2)


def test_yaml_config_with_class_path_and_init_args(tmp_path: Any) -> None:
    config = tmp_path / "adv.yaml"
    config.write_text(
        "trainer:\n"
        "  max_epochs: 3\n"
        "  callbacks:\n"
        "    - class_path: lightning_adv.AWPCallback\n"
        "      init_args:\n"
        "        adv_param: head\n"
        "        adv_lr: 0.1\n"
        "        adv_eps: 0.001\n"
        "        adv_step: 2\n"
        "        start_epoch: 1\n"
        "    - class_path: lightning_adv.FGMCallback\n"
        "      init_args: {epsilon: 0.7}\n"
        "    - class_path: lightning_adv.callbacks.robust.RobustAccuracy\n"
        "      init_args: {epsilon: 0.5, test: false}\n"
        "model:\n"
        "  dim: 4\n"
    )
    c = cli(["--config", str(config)])
    (awp,) = of_type(c.trainer.callbacks, AWPCallback)
    (fgm,) = of_type(c.trainer.callbacks, FGMCallback)
    (robust,) = of_type(c.trainer.callbacks, RobustAccuracy)
    assert (awp.adv_param, awp.adv_lr, awp.adv_eps, awp.adv_step, awp.start_epoch) == ("head", 0.1, 0.001, 2, 1)
    assert fgm.epsilon == 0.7
    assert (robust.epsilon, robust.stages) == (0.5, ["validate"])
    assert c.trainer.max_epochs == 3 and c.model.head.in_features == 4
    # a flag after the config overrides it
    c = cli(["--config", str(config), "--trainer.max_epochs=5"])
    assert c.trainer.max_epochs == 5 and len(of_type(c.trainer.callbacks, AWPCallback)) == 1


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--trainer.callbacks+=lightning_adv.FGMCallback", "--trainer.callbacks.epsilon=abc"], "epsilon"),
        (["--trainer.callbacks+=AWPCallback", "--trainer.callbacks.adv_step=1.5"], "adv_step"),
        (["--trainer.callbacks+=AWPCallback", "--trainer.callbacks.adv_eps=small"], "adv_eps"),
        (["--trainer.callbacks+=FGMCallback", "--trainer.callbacks.not_an_arg=1"], "not_an_arg"),
        (["--trainer.callbacks+=RobustAccuracy", "--trainer.callbacks.num_classes=two"], "num_classes"),
    ],
)
def test_bad_value_is_a_parse_error_naming_the_flag(flags: List[str], named: str, capsys: Any) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli(flags)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert named in err, err


def test_unknown_callback_class_is_a_parse_error(capsys: Any) -> None:
    with pytest.raises(SystemExit):
        cli(["--trainer.callbacks+=lightning_adv.NoSuchCallback"])
    assert "NoSuchCallback" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, docs",
    [
        (
            "lightning_adv.FGMCallback",
            {"epsilon": "L2 norm of the perturbation", "emb_name": "substring of the names of the embedding", "start_epoch": "first epoch"},
        ),
        (
            "lightning_adv.AWPCallback",
            {
                "adv_param": "substring of the names of the parameters",
                "adv_lr": "step size relative to the weight norm",
                "adv_eps": "bound of each element",
                "adv_step": "number of adversarial passes",
                "start_epoch": "first epoch",
            },
        ),
        (
            "lightning_adv.callbacks.robust.RobustAccuracy",
            {"epsilon": "L2 norm of the perturbation", "num_classes": "number of classes", "validate": "measure during validation"},
        ),
        ("lightning_adv.PGDCallback", {"alpha": "step size of each pass", "steps": "number of adversarial passes"}),
        ("lightning_adv.FreeLBCallback", {"adv_steps": "ascent passes after the clean one", "norm_type": "l2"}),
        ("lightning_adv.SMARTCallback", {"adv_alpha": "weight of the regulariser", "norm": "per-token normalisation"}),
        ("lightning_adv.R3FCallback", {"eps": "noise magnitude", "r3f_lambda": "weight of the regulariser"}),
        ("lightning_adv.RDropCallback", {"alpha": "weight of the symmetric KL", "reduction": "batchmean"}),
        ("lightning_adv.VATCallback", {"adv_step_size": "ascent step size", "noise_var": "standard deviation of the initial"}),
        ("lightning_adv.NEFTuneCallback", {"noise_alpha": "", "length": ""}),
    ],
)
def test_callback_help_shows_each_argument_doc(name: str, docs: dict, capsys: Any) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli(["--trainer.callbacks.help", name])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # help text is wrapped
    for arg, doc in docs.items():
        assert f"--trainer.callbacks.{arg}" in out or f"--trainer.callbacks.init_args.{arg}" in out, arg
        assert doc in out, (arg, doc)
    assert "``" not in out  # no raw reST markup in the help


RANGE_ERRORS = [
    ("FGMCallback", "epsilon", "-1", ">= 0"),
    ("FGMCallback", "emb_name", "", "non-empty"),
    ("FGMCallback", "start_epoch", "-1", "integer >= 0"),
    ("AWPCallback", "adv_eps", "-0.1", ">= 0"),
    ("AWPCallback", "adv_lr", "nan", ">= 0"),
    ("AWPCallback", "adv_step", "0", "integer >= 1"),
    ("AWPCallback", "adv_param", " ", "non-empty"),
    ("PGDCallback", "alpha", "-0.3", ">= 0"),
    ("PGDCallback", "steps", "0", "integer >= 1"),
    ("FreeLBCallback", "adv_steps", "0", "integer >= 1"),
    ("FreeLBCallback", "adv_init_mag", "-1", ">= 0"),
    ("FreeLBCallback", "norm_type", "l3", "l2"),
    ("R3FCallback", "eps", "-1e-5", ">= 0"),
    ("R3FCallback", "noise_type", "gauss", "uniform"),
    ("RDropCallback", "alpha", "-0.5", ">= 0"),
    ("RDropCallback", "reduction", "mean", "batchmean"),
    ("VATCallback", "noise_gamma", "-1e-6", ">= 0"),
    ("VATCallback", "norm_type", "fro", "l2"),
    ("VATCallback", "adv_alpha", "-1", ">= 0"),
    ("NEFTuneCallback", "noise_alpha", "-5", ">= 0"),
    ("NEFTuneCallback", "length", "words", "padded"),
    ("NEFTuneCallback", "seed", "-1", "integer >= 0"),
    ("SMARTCallback", "adv_alpha", "-1", ">= 0"),
    ("SMARTCallback", "steps", "0", "integer >= 1"),
    ("SMARTCallback", "norm", "fro", "inf"),
    ("RobustAccuracy", "epsilon", "-1", ">= 0"),
    ("RobustAccuracy", "steps", "0", "integer >= 1"),
    ("RobustAccuracy", "norm_type", "l1", "l2"),
    ("AWPCallback", "start_step", "-5", "integer >= 0"),
]


@pytest.mark.parametrize("callback, arg, value, rule", RANGE_ERRORS)
def test_out_of_range_value_is_a_parse_error_naming_the_flag(callback: str, arg: str, value: str, rule: str, capsys: Any) -> None:
    """A value out of range is refused by the parser (exit code 2, the flag and the rule), not by a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        cli([f"--trainer.callbacks+={callback}", f"--trainer.callbacks.{arg}={value}"])
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"trainer.callbacks" in err and arg in err and rule in err, err[-600:]


def test_out_of_range_value_in_yaml_is_a_parse_error(tmp_path: Any, capsys: Any) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: lightning_adv.FGMCallback\n      init_args:\n        epsilon: -0.5\n")
    with pytest.raises(SystemExit) as exit_info:
        cli([f"--config={config}"])
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "epsilon" in err and ">= 0" in err, err[-600:]


def test_cli_fit_really_attacks(tmp_path: Any) -> None:
    c = LightningCLI(
        CLIModel,
        CLIData,
        args=[
            "fit",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=2",
            "--trainer.num_sanity_val_steps=0",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks+=FGMCallback",
            "--trainer.callbacks.epsilon=0.5",
            "--trainer.callbacks+=AWPCallback",
            "--trainer.callbacks.adv_eps=0.01",
            "--trainer.callbacks+=RobustAccuracy",
            "--trainer.callbacks.epsilon=1.0",
            *QUIET,
        ],
        seed_everything_default=0,
    )
    (fgm,) = of_type(c.trainer.callbacks, FGMCallback)
    (awp,) = of_type(c.trainer.callbacks, AWPCallback)
    (robust,) = of_type(c.trainer.callbacks, RobustAccuracy)
    assert fgm.attacks == 3 and awp.attacks == 3 and fgm.skipped == 0
    assert robust.batches == 2
    assert {"adv/fgm_loss", "adv/awp_loss", "val_robust_acc@1"} <= set(c.trainer.callback_metrics)


class DropCLIModel(CLIModel):
    """CLIModel with dropout, returning its logits (R-Drop)."""

    def __init__(self, vocab: int = 20, dim: int = 8) -> None:
        super().__init__(vocab, dim)
        self.drop = nn.Dropout(0.2)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        ids, y = batch
        logits = self.head(self.drop(self.word_embeddings(ids).mean(1)))
        return {"loss": nn.functional.cross_entropy(logits, y), "logits": logits}


def test_cli_fit_with_rdrop(tmp_path: Any) -> None:
    c = LightningCLI(
        DropCLIModel,
        CLIData,
        args=[
            "fit", "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.callbacks+=RDropCallback",
            "--trainer.callbacks.alpha=0.7", "--trainer.callbacks.reduction=batchmean", *QUIET,
        ],
        seed_everything_default=0,
    )
    (rdrop,) = of_type(c.trainer.callbacks, lightning_adv.RDropCallback)
    assert rdrop.alpha == 0.7 and rdrop.reduction == "batchmean"
    assert rdrop.attacks == 3 and rdrop.skipped == 0
    assert "adv/rdrop_loss" in c.trainer.callback_metrics


# -- "did you mean" (issue 21, point 9) --------------------------------------------------------------------------------
CALLBACKS = "(lightning_adv callbacks: AWPCallback, FGMCallback, FreeLBCallback, MomentumSAMCallback, NEFTuneCallback, PGDCallback, R3FCallback, RDropCallback, RobustAccuracy, SAMCallback, SMARTCallback, TextAttackAccuracy, VATCallback)"


@pytest.mark.parametrize(
    "flags, hint",
    [
        (["--trainer.callbacks+=FGMCalback"], f"did you mean lightning_adv.FGMCallback? {CALLBACKS}"),
        (["--trainer.callbacks+=lightning_adv.SMARTCalback"], f"did you mean lightning_adv.SMARTCallback? {CALLBACKS}"),
        (["--trainer.callbacks+=lightning_adv.Nothing"], f"lightning_adv.Nothing is not a lightning_adv class {CALLBACKS}"),
        (["--trainer.callbacks+=FGMCallback", "--trainer.callbacks.epsilonn=0.5"],
         "did you mean 'epsilon'? FGMCallback takes: epsilon, emb_name, start_epoch, start_step"),
        (["--trainer.callbacks+=RobustAccuracy", "--trainer.callbacks.num_class=3"],
         "did you mean 'num_classes'? RobustAccuracy takes: epsilon, norm_type, steps, step_size, random_start, num_classes, "
         "embedding, seed, validate, test, prog_bar"),
        (["--trainer.callbacks+=AWPCallback", "--trainer.callbacks.zzz=1"],
         "'zzz' is not an argument of AWPCallback; AWPCallback takes: adv_param, adv_lr, adv_eps, start_epoch, adv_step, start_step"),
    ],
)
def test_misspelled_callback_or_argument_gets_a_did_you_mean_line(flags: List[str], hint: str, capsys: Any) -> None:
    from lightning_adv.cli import AdversarialArgumentParser

    with pytest.raises(SystemExit) as exit_info:
        cli(flags, parser_class=AdversarialArgumentParser)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.rstrip().splitlines()[-1] == hint, err[-800:]
    with pytest.raises(SystemExit):  # Lightning's own parser: jsonargparse's message, without the line
        cli(flags)
    plain = capsys.readouterr().err
    assert hint not in plain and plain.rstrip().splitlines()[-1] == err.rstrip().splitlines()[-2]


def test_did_you_mean_in_yaml_subcommands_and_class_flags(tmp_path: Any, capsys: Any) -> None:
    from lightning_adv.cli import AdversarialArgumentParser

    class WithRobust(LightningCLI):
        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.add_lightning_class_args(RobustAccuracy, "robust")

    config = tmp_path / "typo.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: lightning_adv.FGMCallback\n      init_args: {epsilonn: 0.5}\n")
    for args, hint in [
        (["fit", f"--config={config}"], "did you mean 'epsilon'? FGMCallback takes: epsilon, emb_name, start_epoch, start_step"),
        (["fit", "--trainer.callbacks+=FreeLBCalback"], f"did you mean lightning_adv.FreeLBCallback? {CALLBACKS}"),
        (["validate", "--robust.epsilonn=1"], "did you mean --robust.epsilon?"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            WithRobust(CLIModel, CLIData, args=args + QUIET, parser_class=AdversarialArgumentParser, save_config_callback=None)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.rstrip().splitlines()[-1] == hint, args


def test_errors_with_nothing_to_suggest_are_unchanged(capsys: Any) -> None:
    from lightning_adv.cli import AdversarialArgumentParser

    with pytest.raises(SystemExit):
        cli(["--trainer.callbacks+=FGMCallback", "--trainer.callbacks.epsilon=abc"], parser_class=AdversarialArgumentParser)
    ours = capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["--trainer.callbacks+=FGMCallback", "--trainer.callbacks.epsilon=abc"])
    assert ours == capsys.readouterr().err and "epsilon" in ours
