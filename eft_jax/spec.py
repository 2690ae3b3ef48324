"""What to sample from: which loaded model plays which role in the EFT rule, and how it is prompted.

    log p = log p_base + sum_i w_i (log p_ft_i - log p_ref) - log Z

Up-scaling, down-scaling, amplification (w != 1), mixing several fine-tunes (weights lambda, 1 - lambda)
and plain single-model decoding are all values of ``EFTSpec``; the engine has one code path.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from eft_jax.model import Model

# Which model drafts in speculative EFT when none is named: the first fine-tune (role "ft0", engine index
# 2: the small fine-tuned model of an up-scaling spec, the cheapest model whose distribution is closest to
# the EFT one). The one statement of this default: the engine and job configs both read it from here.
DEFAULT_DRAFTER_ROLE = "ft0"


@dataclasses.dataclass(frozen=True, eq=False)
class Component:
    """One model of the rule and its prompt format.

    ``prompt_format``: "chat" (the tokenizer's chat template, with the generation prompt), "plain"
    (the prompt text as is), or a template string containing ``{prompt}`` (a base-style template such
    as ``"Question: {prompt}\\nAnswer:"``).
    """

    model: Model
    prompt_format: str = "plain"
    name: str = ""

    def __post_init__(self) -> None:
        fmt = self.prompt_format
        if fmt not in ("chat", "plain") and "{prompt}" not in fmt:
            raise ValueError(
                f"prompt_format of {self.label} must be 'chat', 'plain' or a template containing '{{prompt}}', got {fmt!r}"
            )
        if fmt == "chat" and (self.model.tokenizer is None or not getattr(self.model.tokenizer, "chat_template", None)):
            raise ValueError(f"{self.label} has prompt_format 'chat' but its tokenizer has no chat template")

    @property
    def label(self) -> str:
        return self.name or self.model.source


def _component(x: Model | Component, default_format: str, name: str) -> Component:
    if isinstance(x, Component):
        return x if x.name else dataclasses.replace(x, name=name)
    return Component(x, default_format, name)


@dataclasses.dataclass(frozen=True, eq=False)
class EFTSpec:
    """The models of one EFT distribution (see the module docstring).

    base: the pretrained model at scale N, whose distribution the reward is added to.
    ref: the pretrained model at scale M (None for plain decoding of ``base``).
    fine_tuned: fine-tunes of ``ref`` at scale M, each with a reward weight in ``weights``.
    base_top_p: conservative decoding - keep only the top-p nucleus of ``base``'s own distribution
      before the reward is added (None: off).
    """

    base: Component
    ref: Component | None = None
    fine_tuned: tuple[Component, ...] = ()
    weights: tuple[float, ...] = ()
    base_top_p: float | None = None

    def __post_init__(self) -> None:
        if (self.ref is None) != (len(self.fine_tuned) == 0):
            raise ValueError("an EFT spec needs both a reference model and at least one fine-tuned model, or neither")
        if len(self.weights) != len(self.fine_tuned):
            raise ValueError(f"{len(self.fine_tuned)} fine-tuned model(s) but {len(self.weights)} weight(s)")
        for w in self.weights:
            if not math.isfinite(w):
                raise ValueError(f"EFT weights must be finite, got {w}")
        if self.base_top_p is not None and not 0.0 < self.base_top_p <= 1.0:
            raise ValueError(f"base_top_p must be in (0, 1] or None, got {self.base_top_p}")
        first = self.base.model.mesh
        for c in self.components:
            if c.model.mesh.axis_names != first.axis_names or tuple(c.model.mesh.devices.flat) != tuple(first.devices.flat):
                raise ValueError(f"all models of an EFT spec must be loaded on the same mesh; {c.label} is not")

    @property
    def components(self) -> tuple[Component, ...]:
        """All models in engine order: base, ref, fine-tunes."""
        return (self.base,) + ((self.ref,) if self.ref else ()) + self.fine_tuned

    @property
    def is_plain(self) -> bool:
        return self.ref is None

    @property
    def default_drafter(self) -> int | None:
        """The index in ``components`` of the model that drafts when none is named (``DEFAULT_DRAFTER_ROLE``);
        None for plain decoding, which has no fine-tune."""
        return None if self.is_plain else 2 + int(DEFAULT_DRAFTER_ROLE[2:])

    # --- The configurations of the paper, by name -------------------------------------------------

    @classmethod
    def single(cls, model: Model | Component, prompt_format: str = "plain") -> EFTSpec:
        """Plain decoding of one model (the baseline)."""
        return cls(base=_component(model, prompt_format, "model"))

    @classmethod
    def up_scaling(cls, large_base: Model | Component, small_base: Model | Component,
                   small_ft: Model | Component | Sequence[Model | Component], weights: float | Sequence[float] = 1.0,
                   *, base_top_p: float | None = None) -> EFTSpec:
        """Large pretrained model + reward of a small fine-tune (the large model behaves as fine-tuned)."""
        return cls._emulate(large_base, small_base, small_ft, weights, base_top_p, ("large_base", "small_base", "small_ft"))

    @classmethod
    def down_scaling(cls, small_base: Model | Component, large_base: Model | Component,
                     large_ft: Model | Component | Sequence[Model | Component], weights: float | Sequence[float] = 1.0,
                     *, base_top_p: float | None = None) -> EFTSpec:
        """Small pretrained model + reward of a large fine-tune."""
        return cls._emulate(small_base, large_base, large_ft, weights, base_top_p, ("small_base", "large_base", "large_ft"))

    @classmethod
    def _emulate(cls, base, ref, fts, weights, base_top_p, names) -> EFTSpec:
        fts = list(fts) if isinstance(fts, (list, tuple)) else [fts]
        weights = [float(weights)] * len(fts) if isinstance(weights, (int, float)) else [float(w) for w in weights]
        return cls(
            base=_component(base, "plain", names[0]),
            ref=_component(ref, "plain", names[1]),
            fine_tuned=tuple(_component(f, "chat" if _has_chat(f) else "plain", f"{names[2]}{i if len(fts) > 1 else ''}")
                             for i, f in enumerate(fts)),
            weights=tuple(weights),
            base_top_p=base_top_p,
        )


def _has_chat(x: Model | Component) -> bool:
    model = x.model if isinstance(x, Component) else x
    return model.tokenizer is not None and bool(getattr(model.tokenizer, "chat_template", None))
