"""The per-example target: the output of a model's input-embedding module, perturbed by a forward hook."""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

MakeDelta = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""Builds the perturbation of one forward: ``(embedding output [B, T, H], mask of real tokens [B, T]) -> delta``."""


def find_embedding(model: nn.Module, path: Optional[str], owner: str) -> Tuple[nn.Module, str]:
    """The input-embedding module of ``model`` and its dotted path.

    ``path`` names it (``"model.embeddings.word_embeddings"``); by default it is ``get_input_embeddings()`` of the
    first submodule that has that method (any ``transformers`` model), so tied (GPT-2, T5), frozen (PEFT/LoRA)
    and lazily built (``configure_model``) embeddings are found as the model uses them.
    """
    names = {id(m): n for n, m in model.named_modules()}
    if path is not None:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"{owner}(embedding={path!r}): {type(model).__name__} has no submodule {path!r}. {_candidates(model)}") from None
        return module, path
    for module in model.modules():
        getter = getattr(module, "get_input_embeddings", None)
        if callable(getter):
            try:
                found = getter()
            except (NotImplementedError, AttributeError):
                continue
            found = _encoder_embedding(module, found)
            if isinstance(found, nn.Module) and id(found) in names:
                return found, names[id(found)]
    raise ValueError(
        f"{owner}(embedding=None): no submodule of {type(model).__name__} has get_input_embeddings() (a transformers "
        f"model). Pass embedding='<dotted path of the input-embedding module>'. {_candidates(model)}"
    )


def _encoder_embedding(model: nn.Module, found: object) -> object:
    """The encoder's own input embedding when it is a different module tied to ``found`` (transformers 5 gives
    T5 and BART ``shared`` plus ``encoder.embed_tokens`` / ``decoder.embed_tokens`` sharing one weight, and the
    forward never calls ``shared``); else ``found``."""
    weight = getattr(found, "weight", None)
    get_encoder = getattr(model, "get_encoder", None)
    if weight is None or not callable(get_encoder):
        return found
    try:
        inner = get_encoder().get_input_embeddings()
    except (NotImplementedError, AttributeError, TypeError, ValueError):
        return found
    return inner if isinstance(inner, nn.Module) and getattr(inner, "weight", None) is weight else found


def _candidates(model: nn.Module) -> str:
    found = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    return f"Embedding modules: {', '.join(found[:10])}." if found else "The model has no nn.Embedding module."


def find_pad_id(model: nn.Module, embedding: nn.Module, path: str) -> Optional[int]:
    """The padding token id: from the config of the closest ``transformers`` model above the embedding, else
    the embedding's ``padding_idx``, else ``None`` (every position counts as a token)."""
    best: Optional[int] = None
    depth = -1
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        pad = getattr(config, "pad_token_id", None)
        inside = name == "" or path == name or path.startswith(name + ".")
        if isinstance(pad, int) and inside and name.count(".") + bool(name) > depth:
            best, depth = pad, name.count(".") + bool(name)
    if best is None:
        best = getattr(embedding, "padding_idx", None)
    return best


class EmbeddingOutput:
    """Adds a per-example perturbation ``delta[B, T, H]`` to the output of the input-embedding module.

    While :meth:`attached`, the first call of the module after :meth:`arm` returns ``output + delta``, with
    ``delta = make(output, mask)`` (``mask``: the positions that are not padding, from the token ids the module
    was called with, positionally or as ``input``/``input_ids``); later calls in the same forward (a T5 decoder
    reusing the shared embedding) are left alone. The last delta and mask stay in :attr:`delta` and
    :attr:`mask`, so that its gradient can be read after the backward. ``attach(first=True)`` runs this hook
    before any other forward hook of the module (FreeLB's ``delta0``, which the other methods' perturbations
    are added to).

    Example::

        >>> emb = torch.nn.Embedding(10, 4, padding_idx=0)
        >>> target = EmbeddingOutput(emb, embedding="")
        >>> target.attach()
        >>> target.arm(lambda out, mask: torch.ones_like(out) * mask[..., None])
        >>> out = emb(torch.tensor([[3, 0]]))
        >>> target.detach()
        >>> (out - emb(torch.tensor([[3, 0]]))).sum(-1).tolist()
        [[4.0, 0.0]]
    """

    def __init__(self, model: nn.Module, embedding: Optional[str] = None, owner: str = "EmbeddingOutput") -> None:
        self.module, self.path = (model, "") if embedding == "" else find_embedding(model, embedding, owner)
        self.pad_id = find_pad_id(model, self.module, self.path)
        self.owner = owner
        self.delta: Optional[torch.Tensor] = None
        self.mask: Optional[torch.Tensor] = None
        self.calls = 0
        self._make: Optional[MakeDelta] = None
        self._detach = False
        self._handle: Optional[torch.utils.hooks.RemovableHandle] = None

    def attach(self, first: bool = False) -> None:
        if self._handle is None:
            self._handle = self.module.register_forward_hook(self._hook, prepend=first, with_kwargs=True)

    @property
    def armed(self) -> bool:
        """Whether the next call of the module will be perturbed."""
        return self._make is not None

    def require_called(self) -> torch.Tensor:
        """The delta of the last armed call; raises ``RuntimeError`` naming the fix when the module was not called
        (the model embeds elsewhere, e.g. from ``inputs_embeds``)."""
        if self.delta is None:
            raise RuntimeError(
                f"{self.owner}: the embedding module {self.path!r} was not called by the step's forward; the "
                "perturbation needs the model to embed its input ids with it. Pass embedding= naming the module that "
                "embeds the tokens (and call the model with input ids, not inputs_embeds)."
            )
        return self.delta

    def detach(self) -> None:
        self._make = None
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def arm(self, make: MakeDelta, detach: bool = False) -> None:
        """Perturb the next call of the module with ``make(output, mask)``; with ``detach``, the perturbed output
        is cut from the embedding's graph (``output.detach() + delta``: no gradient to the embedding through it)."""
        self._make = make
        self._detach = detach
        self.delta = self.mask = None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> Optional[torch.Tensor]:
        make, self._make = self._make, None
        if make is None:
            return None
        if not isinstance(output, torch.Tensor) or output.dim() != 3:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(
                f"{self.owner}: the embedding module {self.path or type(module).__name__!r} returned {shape}; a "
                "per-example perturbation needs [batch, tokens, hidden]. Pass embedding= naming the token-embedding module."
            )
        ids = _token_ids(args, kwargs)
        if ids is not None and self.pad_id is not None and ids.shape == output.shape[:2]:
            mask = ids != self.pad_id
        else:
            mask = torch.ones(output.shape[:2], dtype=torch.bool, device=output.device)
        delta = make(output, mask)
        self.delta, self.mask = delta, mask
        self.calls += 1
        return (output.detach() if self._detach else output) + delta.to(output.dtype)


def _token_ids(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The integer token ids an embedding module was called with: the first positional argument, or the keyword
    ``input`` (``nn.Embedding``) or ``input_ids`` (a transformers embeddings module)."""
    for ids in (args[0] if args else None, kwargs.get("input"), kwargs.get("input_ids")):
        if isinstance(ids, torch.Tensor) and not ids.is_floating_point() and not ids.is_complex():
            return ids
    return None


def lengths(mask: torch.Tensor) -> torch.Tensor:
    """The number of real (non-padding) tokens of each example, at least 1."""
    return mask.sum(1).clamp_min(1)


def per_example_norms(x: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """The ``p``-norm of each example of ``x[B, ...]`` over all its other dimensions, shaped ``[B, 1, 1]``."""
    return torch.linalg.vector_norm(x.flatten(1), ord=p, dim=1).view(-1, *([1] * (x.dim() - 1)))


__all__: List[str] = ["EmbeddingOutput", "find_embedding", "find_pad_id", "lengths", "per_example_norms"]
