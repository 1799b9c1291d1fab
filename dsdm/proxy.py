"""Proxy language models: construction, a small training loop, and pickle-free serialisation.

The proxy is a Hugging Face GPT-NeoX causal LM built from a config (no download, no remote
code). GPT-NeoX rather than GPT-2 because its projections are plain `nn.Linear` layers
(GPT-2's `Conv1D` stores weights transposed), which is what the factored gradient features of
`dsdm.features` support; rather than Llama because its LayerNorm + GELU blocks with biases are
the smallest standard decoder that trains stably at this size, and rotary positions let the
features ignore left padding when position ids are given. Attention is the "eager"
implementation so that per-example gradients with `torch.func.vmap` work and both feature
paths run the same arithmetic.

Token conventions used throughout the engine: `input_ids` [N, L]; `loss_mask` [N, L] bool,
True where token t is scored (predicted from positions < t); position 0 is never scored.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

logger = logging.getLogger(__name__)


class ProxyConfig(BaseModel):
    """Architecture and training recipe of one proxy model (JSON-able, saved beside weights)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False,
                              use_attribute_docstrings=True)

    vocab_size: int = Field(4096, gt=0)
    """Number of token ids; every id in the data must be < vocab_size."""
    hidden_size: int = Field(128, gt=0)
    """Width of the residual stream."""
    num_layers: int = Field(2, gt=0)
    """Number of transformer blocks."""
    num_heads: int = Field(4, gt=0)
    """Attention heads; must divide hidden_size."""
    intermediate_size: int | None = Field(None, gt=0)
    """MLP width; None means 4 x hidden_size."""
    seq_len: int = Field(128, gt=1)
    """Maximum sequence length (rotary positions are valid up to it)."""
    lr: float = Field(1e-3, gt=0)
    """Peak AdamW learning rate, reached after the warmup."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Learning rate at the end of the cosine decay, as a fraction of lr."""
    warmup_steps: int = Field(20, ge=0)
    """Steps of linear warmup from 0 to lr."""
    epochs: int = Field(1, gt=0)
    """Passes over the training examples (each in a fresh seeded order)."""
    max_steps: int | None = Field(None, gt=0)
    """Cap on the number of optimiser steps; None means all epochs."""
    batch_size: int = Field(32, gt=0)
    """Examples per optimiser step (the last batch of an epoch may be smaller)."""
    grad_clip: float = Field(1.0, ge=0)
    """Global gradient-norm clip; 0 disables clipping."""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW decoupled weight decay, applied to matrices only (not biases or norms)."""
    beta1: float = Field(0.9, ge=0, lt=1)
    """AdamW first-moment decay."""
    beta2: float = Field(0.95, ge=0, lt=1)
    """AdamW second-moment decay."""
    seed: int = 0
    """Seeds the weight initialisation and the data order (nothing else is random)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; `ProxyConfig.model_validate(d)` restores it."""
        return self.model_dump(mode="json")


def _hf_config(config: ProxyConfig) -> GPTNeoXConfig:
    if config.hidden_size % config.num_heads:
        raise ValueError(
            f"num_heads={config.num_heads} must divide hidden_size={config.hidden_size}"
        )
    return GPTNeoXConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size or 4 * config.hidden_size,
        max_position_embeddings=config.seq_len,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cache=False,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )


def build_proxy(config: ProxyConfig) -> GPTNeoXForCausalLM:
    """A freshly initialised proxy; same config (incl. seed) -> identical weights.

    Initialisation draws from the global RNG inside transformers, so it runs under
    `fork_rng`: the caller's global RNG state is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = GPTNeoXForCausalLM(_hf_config(config))
    return model.eval()


def causal_lm_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """Mean next-token cross-entropy over scored tokens.

    logits [B, L, V] (position t-1 predicts token t), input_ids [B, L], loss_mask [B, L].
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = loss_mask[:, 1:].to(nll.dtype)
    return (nll * mask).sum() / mask.sum().clamp_min(1.0)


#: fewest optimiser steps after the warmup for a proxy whose loss must be seen to fall (the
#: `loss_fell` check compares the first and last tenth of the curve)
MIN_STEPS_AFTER_WARMUP = 10


def training_steps(n_examples: int, config: ProxyConfig) -> int:
    """Optimiser steps `train_proxy` takes on `n_examples`: epochs x ceil(N / batch_size),
    capped at max_steps."""
    total = config.epochs * math.ceil(n_examples / config.batch_size)
    return total if config.max_steps is None else min(total, config.max_steps)


def check_trainable(n_examples: int, config: ProxyConfig, what: str) -> None:
    """Raise ValueError when `n_examples` give fewer than warmup_steps +
    MIN_STEPS_AFTER_WARMUP steps, naming `what` is too small and the minimum it needs."""
    needed = config.warmup_steps + MIN_STEPS_AFTER_WARMUP
    steps = training_steps(n_examples, config)
    if steps >= needed:
        return
    if config.max_steps is not None and config.max_steps < needed:
        remedy = f"raise max_steps to at least {needed}"
    else:  # ceil(n / batch) * epochs >= needed from this many examples on
        examples = (math.ceil(needed / config.epochs) - 1) * config.batch_size + 1
        remedy = (f"it needs at least {examples} examples, or more epochs, a smaller "
                  "batch_size or fewer warmup_steps")
    raise ValueError(
        f"{what} has {n_examples} examples: {steps} optimiser steps of {config.batch_size} over "
        f"{config.epochs} epoch(s), fewer than the {needed} a proxy needs (warmup_steps "
        f"{config.warmup_steps} + {MIN_STEPS_AFTER_WARMUP}); {remedy}")


def lr_at(step: int, total_steps: int, config: ProxyConfig) -> float:
    """Learning rate of optimiser step `step` (0-based): linear warmup, then cosine decay."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    min_lr = config.lr * config.min_lr_ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - min_lr)


@dataclass(frozen=True)
class TrainProgress:
    """What the training loop reports every `log_every` steps (and at the last step)."""

    step: int
    """Optimiser steps done so far."""
    total_steps: int
    """Optimiser steps planned."""
    loss: float
    """Loss of the latest batch."""
    lr: float
    """Learning rate used by the latest step."""
    tokens_per_s: float
    """Input tokens processed per second since the previous report."""


@dataclass
class TrainResult:
    """A trained proxy (in eval mode), its per-step training loss, and weight snapshots."""

    model: GPTNeoXForCausalLM
    losses: list[float] = field(default_factory=list)
    checkpoints: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    """Step -> CPU copy of the state dict after that many optimiser steps (the steps asked
    for with `checkpoint_steps`; the last step's entry equals `model`'s weights)."""


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Decay matrices (linear weights, embeddings), not biases or norm gains, as nanoGPT does.
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def train_proxy(
    config: ProxyConfig,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    *,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    log_every: int = 50,
    callback: Callable[[TrainProgress], None] | None = None,
    checkpoint_steps: Sequence[int] = (),
) -> TrainResult:
    """Train a fresh proxy on `input_ids` [N, L] with AdamW and a warmup+cosine schedule.

    `loss_mask` [N, L] bool selects the scored tokens (default: all positions but the
    first). The data order comes from a `torch.Generator` seeded with `config.seed`;
    the global RNG is not used. `bf16` enables bfloat16 autocast (CUDA only).
    `checkpoint_steps`: optimiser steps (1..total) after which the weights are copied into
    `TrainResult.checkpoints` (TRAK's checkpoints along one training run).
    """
    if input_ids.ndim != 2 or input_ids.shape[1] > config.seq_len:
        raise ValueError(f"input_ids must be [N, L<= {config.seq_len}], got {input_ids.shape}")
    if loss_mask is None:
        loss_mask = torch.ones_like(input_ids, dtype=torch.bool)
        loss_mask[:, 0] = False
    if loss_mask.shape != input_ids.shape:
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} != input_ids {input_ids.shape}")
    device = torch.device(device)
    if bf16 and device.type != "cuda":
        raise ValueError("bf16 autocast is only supported on CUDA devices")

    model = build_proxy(config).to(device).train()
    optim = torch.optim.AdamW(
        _param_groups(model, config.weight_decay), lr=config.lr, betas=(config.beta1, config.beta2)
    )
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    n = input_ids.shape[0]
    total = training_steps(n, config)
    snapshot_at = set(checkpoint_steps)
    outside = sorted(s for s in snapshot_at if not 1 <= s <= total)
    if outside:
        raise ValueError(f"checkpoint_steps {outside} lie outside this run's steps 1..{total}")
    checkpoints: dict[int, dict[str, torch.Tensor]] = {}

    losses: list[float] = []
    step, tokens, t0 = 0, 0, time.perf_counter()
    while step < total:
        for idx in torch.randperm(n, generator=gen).split(config.batch_size):
            if step >= total:
                break
            lr = lr_at(step, total, config)
            for group in optim.param_groups:
                group["lr"] = lr
            ids = input_ids[idx].to(device)
            mask = loss_mask[idx].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=ids).logits
            loss = causal_lm_loss(logits, ids, mask)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optim.step()
            step += 1
            tokens += ids.numel()
            losses.append(loss.item())
            if step in snapshot_at:
                checkpoints[step] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            if step % log_every == 0 or step == total:
                elapsed = time.perf_counter() - t0
                progress = TrainProgress(step, total, losses[-1], lr, tokens / max(elapsed, 1e-9))
                logger.info(
                    "proxy step %d/%d loss %.4f lr %.2e tokens/s %.0f",
                    step, total, progress.loss, lr, progress.tokens_per_s,
                )
                if callback is not None:
                    callback(progress)
                tokens, t0 = 0, time.perf_counter()
    return TrainResult(model=model.eval(), losses=losses, checkpoints=checkpoints)


def proxy_to_bytes(model: torch.nn.Module) -> bytes:
    """The model's state dict as safetensors bytes (no pickle); the caller writes the file."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return safetensors_save(state)


def load_proxy(
    config: Mapping[str, Any], weights: bytes, *, device: torch.device | str = "cpu",
    source: str = "proxy weights",
) -> GPTNeoXForCausalLM:
    """Rebuild a proxy from `ProxyConfig.to_dict()` and `proxy_to_bytes()` output (eval mode).

    Loading is strict: a missing or unexpected tensor raises. `source` (the file's path)
    names the file in the ValueError raised for a truncated or foreign one.
    """
    model = build_proxy(ProxyConfig.model_validate(dict(config)))
    try:
        state = safetensors_load(weights)
    except SafetensorError as error:
        raise ValueError(f"{source}: not a readable proxy checkpoint ({error})") from error
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def fit_to_data(config: ProxyConfig, vocab_size: int, seq_len: int) -> ProxyConfig:
    """``config`` completed with the tokenizer's vocabulary size and the corpus' sequence
    length; a ValueError when the user set either to something else."""
    derived = {"vocab_size": vocab_size, "seq_len": seq_len}
    for key, value in derived.items():
        given = getattr(config, key)
        if key in config.model_fields_set and given != value:
            raise ValueError(f"model.{key}={given} contradicts the data ({value}); leave it unset")
    return ProxyConfig.model_validate({**config.model_dump(), **derived})


def loss_summary(curve: Sequence[float]) -> dict[str, float | int]:
    """A training-loss curve in three numbers: steps, and the mean loss over its first and
    over its last tenth (at least one step each)."""
    tenth = max(1, len(curve) // 10)
    return {"steps": len(curve), "first_loss": float(np.mean(curve[:tenth])),
            "last_loss": float(np.mean(curve[-tenth:]))}
