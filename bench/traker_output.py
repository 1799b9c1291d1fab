"""The model output that `traker` (TRAK's reference library, the `bench` extra) needs for a
causal LM: the same margin and out-to-loss weight as `dsdm.features`.

traker ships model outputs for image, text classification and CLIP models only. This one
computes, for one example z (traker vmaps over the batch), f(z) = sum over scored tokens of
log(p_t / (1 - p_t)), and for a batch q(z) = mean over scored tokens of (1 - p_t), with the
engine's own `margins_and_q` and `model_inputs`, so the three featurisers compared by
`bench/featurize.py` differentiate one function.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call
from trak.modelout_functions import AbstractModelOutput

from dsdm.features import margins_and_q, model_inputs


def traker_batch(input_ids: torch.Tensor, loss_mask: torch.Tensor,
                 attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The batch tuple `CausalLMMargin` expects: ids, loss mask, and the model's 4-D attention
    mask and position ids (made outside traker's vmap: `model_inputs` writes in place)."""
    inputs = model_inputs(attention_mask.bool(), torch.float32)
    return input_ids, loss_mask, inputs["attention_mask"], inputs["position_ids"]


def _logits(model: nn.Module, params: tuple[dict, dict], input_ids: torch.Tensor,
            mask4: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    kwargs = {"input_ids": input_ids, "attention_mask": mask4, "position_ids": position_ids}
    return functional_call(model, params, args=(), kwargs=kwargs).logits


class CausalLMMargin(AbstractModelOutput):
    """traker model output of a batch made by `traker_batch` under a Hugging Face causal LM."""

    def __init__(self) -> None:
        super().__init__()

    @staticmethod
    def get_output(model: nn.Module, weights: dict, buffers: dict, input_ids: torch.Tensor,
                   loss_mask: torch.Tensor, mask4: torch.Tensor,
                   position_ids: torch.Tensor) -> torch.Tensor:
        """f(z) of one example (traker vmaps this over the batch and differentiates it)."""
        logits = _logits(model, (weights, buffers), input_ids[None], mask4[None],
                         position_ids[None])
        f, _ = margins_and_q(logits, input_ids[None], loss_mask[None])
        return f[0]

    def get_out_to_loss_grad(self, model: nn.Module, weights: dict, buffers: dict,
                             batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """q [B, 1] of a batch."""
        input_ids, loss_mask, mask4, position_ids = batch
        with torch.no_grad():
            logits = _logits(model, (weights, buffers), input_ids, mask4, position_ids)
            _, q = margins_and_q(logits, input_ids, loss_mask)
        return q[:, None]
