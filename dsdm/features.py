"""Gradient features phi(z) and out-to-loss weights q(z) of examples under a proxy model.

For an example z with scored tokens t (`loss_mask[t]`), p_t the probability of the correct
token t given positions < t:

- TRAK model output (multi-class margin): f(z) = sum_t log(p_t / (1 - p_t)),
- feature: phi(z) = P^T grad_W f(z), P a seeded random projection (`dsdm.projection`),
- out-to-loss weight: q(z) = mean_t (1 - p_t)  (0 for an example with no scored token).

With `model_output="log_prob"` the model output is instead f(z) = sum_t log p_t, whose gradient
is sum_t (1 - p_t) grad log(p_t / (1 - p_t)): each token's margin gradient weighted by its
own out-to-loss factor, which TRAK's per-example q only averages. q is then 1.

Which parameters are featurised (the one place this is decided, `featurised_layers`): the
weight of every `nn.Linear` in the model except the output embedding (LM head), which is
included only with `include_lm_head=True`, and the input embedding with
`include_embeddings=True` (its weight [V, H] is treated as the linear map from one-hot tokens,
gradient [H, V] = sum_t delta_t onehot(x_t)^T, so P_in x_t is a column of P_in). Biases and
norm gains are not featurised. Any other module owning a parameter of two or more dimensions (GPT-2's
`Conv1D`, convolutions, ...) raises `UnsupportedLayerError` rather than being skipped.

Two featurisers implement one interface (`GradientFeaturizer`):
- `ExactFeaturizer`: per-example weight gradients with `torch.func` (`vmap(grad)`), then
  projected; a reference for tests and small models.
- `FactoredFeaturizer` (default): hooks on one ordinary forward/backward of sum_i f(z_i)
  collect, per linear layer, inputs x_t and output gradients delta_t; the per-example
  gradient sum_t delta_t x_t^T is projected as sum_t (P_out delta_t)(P_in x_t)^T without ever
  being formed. With a summed objective the output gradients of example i depend on example i
  only (no batch-coupling layers such as batch norm exist in the proxy), so one batched
  backward gives every example's factors.

Padding: an optional `attention_mask` [N, L] marks real tokens; position ids count real tokens
only, so left or right padding leaves phi unchanged. Padded positions get no attention and
contribute nothing.
"""

from __future__ import annotations

import contextlib
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.func import functional_call, grad, vmap
from transformers import GPTNeoXForCausalLM

from dsdm.projection import (
    CountSketch,
    DenseProjector,
    LayerProjection,
    ProjectionKind,
    make_layer_projection,
)

logger = logging.getLogger(__name__)

AutocastDtype = Literal["float32", "bfloat16"]
ModelOutput = Literal["margin", "log_prob"]


class UnsupportedLayerError(TypeError):
    """The model holds a weight matrix in a module type the featurisers do not handle."""


class FeatureConfig(BaseModel):
    """How phi is computed; saved beside every gradient shard so shards stay comparable."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False,
                              use_attribute_docstrings=True)

    method: Literal["factored", "exact"] = "factored"
    """'factored' (hooks, cost near one training step) or 'exact' (torch.func reference)."""
    projection: ProjectionKind = "rademacher"
    """Distribution of the projection entries."""
    seed: int = 0
    """Base seed; layer projections use derive_seed(seed, layer name). Same for all examples
    of one proxy (candidates and targets)."""
    target_dim: int = Field(8192, gt=0)
    """d. With sketch='countsketch', exactly the width of phi; with 'none', the total that
    `choose_layer_dims` splits across layers (roughly). 8,192 is where the hidden layers'
    TRAK scores reach Spearman 0.9 against unprojected TRAK (docs/PERFORMANCE.md); the
    CountSketch costs the same at any d, the kernel and its solve grow as d^2 and d^3."""
    sketch: Literal["countsketch", "none"] = "countsketch"
    """'countsketch': a wide Kronecker stage per layer (each side projected to at most
    `factor_dim`, a side no larger kept exact), concatenated and hashed to target_dim by a
    `CountSketch`. 'none': small per-layer Kronecker factors whose sizes add up to
    target_dim (LoGra's layout; cheaper, much noisier)."""
    factor_dim: int = Field(128, gt=0)
    """With sketch='countsketch': the largest k_out and k_in of the Kronecker stage."""
    k_out: int | None = Field(None, gt=0)
    """If set together with k_in: the same (k_out, k_in) for every layer (capped at the
    layer's sizes with a sketch), instead of what target_dim / factor_dim give."""
    k_in: int | None = Field(None, gt=0)
    """See k_out."""
    include_lm_head: bool = False
    """Also featurise the output embedding (LM head) weight. Off by default: its vocabulary
    side, cut to `factor_dim` rows, drags the scores' fidelity to unprojected TRAK from 0.91
    to 0.42, and with it on the bench selects no better (docs/EVALUATION.md, ablations)."""
    include_embeddings: bool = False
    """Also featurise the input embedding weight (the model's `get_input_embeddings()`);
    nearly free in the factored path (P_in x_t is a column lookup). Off by default, for the
    reason given for `include_lm_head`."""
    batch_size: int = Field(16, gt=0)
    """Examples per forward/backward."""
    autocast_dtype: AutocastDtype = "float32"
    """'bfloat16' runs the model under bf16 autocast (meant for CUDA); projections are
    accumulated in float32 either way."""
    model_output: ModelOutput = "margin"
    """The model output f whose gradient is phi: 'margin' (TRAK's sum of log(p / (1 - p)),
    with q the mean out-to-loss weight) or 'log_prob' (sum of log p: the tokens' weights
    inside the gradient, q = 1)."""

    def identity(self) -> dict:
        """The settings that determine phi and q, i.e. everything but `SPEED_ONLY_SETTINGS`:
        what names a feature folder, and what candidate and target features must share."""
        return self.model_dump(exclude=set(SPEED_ONLY_SETTINGS))


#: FeatureConfig fields that change how fast features are computed, not the features (up to
#: float rounding): left out of `FeatureConfig.identity`, so changing them re-uses finished
#: features.
SPEED_ONLY_SETTINGS = ("batch_size",)


@dataclass(frozen=True)
class Features:
    """Per-example outputs of a featuriser."""

    phi: torch.Tensor
    """[N, d] float32 projected gradients of f."""
    q: torch.Tensor
    """[N] float32 out-to-loss weights, mean over scored tokens of (1 - p_t)."""
    margin: torch.Tensor
    """[N] float32 model outputs f(z)."""


FeaturisedLayer = nn.Linear | nn.Embedding


def featurised_layers(
    model: nn.Module, *, include_lm_head: bool, include_embeddings: bool = False
) -> dict[str, FeaturisedLayer]:
    """The layers whose weights are featurised, by module name, in model order."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    layers: dict[str, FeaturisedLayer] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if module is not head or include_lm_head:
                layers[name] = module
        elif isinstance(module, nn.Embedding):
            if include_embeddings and module is embeddings:
                layers[name] = module
        else:
            for pname, p in module.named_parameters(recurse=False):
                if p.ndim >= 2:
                    raise UnsupportedLayerError(
                        f"{name}.{pname} of type {type(module).__name__} has a "
                        f"{p.ndim}-D weight; only nn.Linear weights can be featurised "
                        "(GPT-2's Conv1D stores weights transposed: use a GPT-NeoX/Llama proxy)"
                    )
    if not layers:
        raise UnsupportedLayerError("the model has no nn.Linear layer to featurise")
    return layers


def layer_shape(layer: FeaturisedLayer) -> tuple[int, int]:
    """(out, in) of the weight gradient as the projections see it: [out_features,
    in_features] for a linear layer, [embedding_dim, num_embeddings] for an embedding (its
    weight is stored transposed to that)."""
    if isinstance(layer, nn.Embedding):
        return layer.embedding_dim, layer.num_embeddings
    return layer.out_features, layer.in_features


def choose_layer_dims(
    shapes: Mapping[str, tuple[int, int]], target_dim: int
) -> dict[str, tuple[int, int]]:
    """Per-layer (k_out, k_in) with sum of k_out * k_in close to `target_dim`.

    shapes: layer name -> (out_features, in_features). Each layer gets an equal share
    target_dim / n_layers, split into near-square factors no larger than the layer itself.
    """
    if target_dim <= 0 or not shapes:
        raise ValueError("need a positive target_dim and at least one layer")
    share = target_dim / len(shapes)
    dims: dict[str, tuple[int, int]] = {}
    for name, (out_f, in_f) in shapes.items():
        k_in = min(in_f, max(1, round(math.sqrt(share))))
        k_out = min(out_f, max(1, round(share / k_in)))
        k_in = min(in_f, max(1, round(share / k_out)))
        dims[name] = (k_out, k_in)
    return dims


def layer_projections(
    model: nn.Module, config: FeatureConfig, *, device: torch.device | str = "cpu"
) -> list[LayerProjection]:
    """The seeded (P_out, P_in) pairs for every featurised layer of `model`, in model order."""
    layers = featurised_layers(model, include_lm_head=config.include_lm_head,
                               include_embeddings=config.include_embeddings)
    shapes = {n: layer_shape(m) for n, m in layers.items()}
    if (config.k_out is None) != (config.k_in is None):
        raise ValueError("set both k_out and k_in, or neither (then target_dim is used)")
    sketched = config.sketch == "countsketch"
    if config.k_out is not None and config.k_in is not None:
        dims = {n: (config.k_out, config.k_in) for n in shapes}
    elif sketched:
        dims = {n: (config.factor_dim, config.factor_dim) for n in shapes}
    else:
        dims = choose_layer_dims(shapes, config.target_dim)
    if sketched:
        dims = {n: (min(k_o, shapes[n][0]), min(k_i, shapes[n][1])) for n, (k_o, k_i) in dims.items()}
    return [
        make_layer_projection(
            n, *shapes[n], *dims[n], kind=config.projection, seed=config.seed,
            exact_full_sides=sketched, device=device,
        )
        for n in shapes
    ]


def make_sketch(projections: Sequence[LayerProjection], config: FeatureConfig,
                *, device: torch.device | str = "cpu") -> CountSketch | None:
    """The second stage `config` asks for over these layer projections, or None."""
    if config.sketch == "none":
        return None
    return CountSketch.make(sum(p.dim for p in projections), config.target_dim,
                            seed=config.seed, device=device)


def margins_and_q(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
    model_output: ModelOutput = "margin",
) -> tuple[torch.Tensor, torch.Tensor]:
    """f [B] and q [B] from logits [B, L, V] (position t-1 predicts token t).

    log(p/(1-p)) = z_y - logsumexp_{j != y} z_j and 1 - p = exp(logsumexp_{j != y} z_j -
    logsumexp_j z_j): both stay finite for any logits, unlike log(p) - log1p(-p).
    With model_output='log_prob', f is sum_t log p_t and q is 1.
    """
    z = logits[:, :-1].float()
    y = input_ids[:, 1:, None]
    scored = loss_mask[:, 1:]
    z_y = z.gather(-1, y).squeeze(-1)
    lse_all = z.logsumexp(-1)
    lse_other = z.scatter(-1, y, float("-inf")).logsumexp(-1)
    zero = torch.zeros_like(z_y)
    if model_output == "log_prob":
        f = torch.where(scored, z_y - lse_all, zero).sum(-1)
        return f, torch.ones_like(f)
    f = torch.where(scored, z_y - lse_other, zero).sum(-1)
    one_minus_p = torch.where(scored, torch.exp(lse_other - lse_all), zero)
    q = one_minus_p.sum(-1) / scored.sum(-1).clamp_min(1).to(z.dtype)
    return f, q


def model_inputs(attention_mask: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """4-D additive attention mask [B, 1, L, L] and position ids [B, L] from a [B, L] mask.

    A query attends to earlier real tokens; a padded query attends to itself only, so its
    (unused) activations stay finite and never turn into NaN that could leak through 0-weights.
    """
    b, length = attention_mask.shape
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=attention_mask.device))
    allowed = causal & attention_mask[:, None, :]
    allowed |= torch.eye(length, dtype=torch.bool, device=attention_mask.device)
    additive = torch.zeros(b, 1, length, length, dtype=dtype, device=attention_mask.device)
    additive.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    return {"attention_mask": additive, "position_ids": position_ids}


@contextlib.contextmanager
def _featurising(model: nn.Module) -> Iterator[None]:
    """Eval mode, and no parameter requires grad: phi needs d f / d (layer outputs) only, so
    autograd then neither keeps layer inputs for weight gradients nor computes them."""
    was_training = model.training
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)
        model.train(was_training)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host batch -> device; on CUDA through pinned memory, without blocking the host."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class _HostCopy:
    """Features of one batch on their way to host memory (float32 on the CPU).

    On CUDA, the copies go to pinned buffers without blocking and `wait` synchronises on an
    event recorded after them; elsewhere the copy is made at once.
    """

    def __init__(self, phi: torch.Tensor, q: torch.Tensor, margin: torch.Tensor) -> None:
        tensors = [t.detach().float() for t in (phi, q, margin)]
        self.event = None
        if tensors[0].device.type == "cuda":
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for h, t in zip(host, tensors, strict=True):
                h.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
            tensors = host
        self.tensors = [t.cpu() for t in tensors]

    def wait(self) -> Features:
        if self.event is not None:
            self.event.synchronize()
        phi, q, margin = self.tensors
        return Features(phi=phi, q=q, margin=margin)


class GradientFeaturizer(ABC):
    """Computes `Features` for a batch stream; subclasses differ in how gradients are formed.

    `projections` fix the featurised layers (by name, in order) and the (P_out, P_in) pairs;
    `sketch`, when given, maps their concatenated outputs to phi (the second stage).
    """

    def __init__(
        self,
        projections: Sequence[LayerProjection],
        *,
        sketch: CountSketch | None = None,
        batch_size: int = 16,
        autocast_dtype: AutocastDtype = "float32",
        model_output: ModelOutput = "margin",
    ) -> None:
        if not projections:
            raise ValueError("at least one layer projection is needed")
        self.projections = list(projections)
        if sketch is not None and sketch.dim_in != sum(p.dim for p in self.projections):
            raise ValueError(f"sketch takes {sketch.dim_in} inputs, the layer projections give "
                             f"{sum(p.dim for p in self.projections)}")
        self.sketch = sketch
        self.batch_size = batch_size
        self.autocast_dtype = autocast_dtype
        self.model_output = model_output

    def __call__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        loss_mask: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
    ) -> Features:
        """All of `batches`, concatenated: phi [N, d], q [N], margin [N] on the CPU."""
        parts = list(self.batches(model, input_ids, loss_mask, attention_mask=attention_mask,
                                  device=device))
        return Features(
            phi=torch.cat([p.phi for p in parts]),
            q=torch.cat([p.q for p in parts]),
            margin=torch.cat([p.margin for p in parts]),
        )

    def batches(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        loss_mask: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
    ) -> Iterator[Features]:
        """Features of consecutive batches of `batch_size` rows, for writing as they come.

        input_ids [N, L] long, loss_mask [N, L] bool, attention_mask [N, L] bool or None
        (None: every token is real). The model is moved to `device` and run in eval mode;
        yielded tensors are float32 on the CPU.
        """
        if input_ids.ndim != 2 or loss_mask.shape != input_ids.shape:
            raise ValueError(f"need input_ids [N, L] and a loss_mask of the same shape, got "
                             f"{tuple(input_ids.shape)} and {tuple(loss_mask.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(loss_mask, dtype=torch.bool)
        loss_mask, attention_mask = loss_mask.bool(), attention_mask.bool()
        if loss_mask[:, 0].any():
            raise ValueError("loss_mask[:, 0] must be False: the first token has no prefix")
        if (loss_mask & ~attention_mask).any():
            raise ValueError("a scored token is marked as padding in attention_mask")
        device = torch.device(device)
        if self.autocast_dtype == "bfloat16" and device.type != "cuda":
            logger.warning("bfloat16 autocast on %s: supported, but meant for CUDA", device)
        layers = featurised_layers(model, include_lm_head=self._includes_head(model),
                                   include_embeddings=self._includes_embeddings(model))
        names = [p.name for p in self.projections]
        if list(layers) != names:
            raise ValueError(f"projections are for layers {names}, model has {list(layers)}")
        model.to(device)
        projs = [replace(p, p_out=p.p_out.to(device), p_in=p.p_in.to(device))
                 for p in self.projections]
        sketch = self.sketch.to(device) if self.sketch is not None else None
        pending: _HostCopy | None = None
        with _featurising(model):
            for start in range(0, input_ids.shape[0], self.batch_size):
                sl = slice(start, start + self.batch_size)
                phi, f, q = self._batch(
                    model,
                    layers,
                    projs,
                    *(_to_device(t[sl], device) for t in (input_ids, loss_mask, attention_mask)),
                )
                if sketch is not None:
                    phi = sketch.apply(phi)
                copy = _HostCopy(phi, q, f)
                if copy.event is None:
                    yield copy.wait()
                    continue
                # On CUDA the copy to the host is asynchronous: batch k is handed out while
                # the device already works on batch k + 1.
                done, pending = pending, copy
                if done is not None:
                    yield done.wait()
        if pending is not None:
            yield pending.wait()

    @property
    def dim(self) -> int:
        """d, the width of phi: the sketch's output, or sum over layers of k_out * k_in."""
        if self.sketch is not None:
            return self.sketch.dim_out
        return sum(p.dim for p in self.projections)

    def _includes_head(self, model: nn.Module) -> bool:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        modules = dict(model.named_modules())
        return head is not None and any(modules.get(p.name) is head for p in self.projections)

    def _includes_embeddings(self, model: nn.Module) -> bool:
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        modules = dict(model.named_modules())
        return embeddings is not None and any(modules.get(p.name) is embeddings
                                              for p in self.projections)

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager[None]:
        enabled = self.autocast_dtype == "bfloat16"
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)

    @abstractmethod
    def _batch(
        self,
        model: nn.Module,
        layers: dict[str, nn.Linear],
        projs: list[LayerProjection],
        input_ids: torch.Tensor,
        loss_mask: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One batch on the model's device -> (phi [B, d], f [B], q [B])."""


_HEAD_CHUNK_ELEMENTS = 1 << 20
"""Logit entries (rows x vocabulary) that the factored path handles at once: 4 MB in float32,
so a chunk of logits stays in cache while f, q and d f / d logits are formed in place in it.
Materialising the batch's [B, L, V] logits and differentiating through logsumexp with autograd
took over 40% of the featurisation time at V = 4096 (docs/PERFORMANCE.md)."""
_ACCELERATOR_CHUNK_ELEMENTS = 1 << 25
"""The same on an accelerator (128 MB in float32): large enough that kernel launches do not
dominate, small enough to leave memory for big batches."""


def _margin_grad_(z: torch.Tensor, y: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Per-row margins log(p / (1 - p)) [n]; overwrites float32 logits z [n, V] with d f / d z.

    y [n]: the token each row predicts; scored [n] bool. For f = sum over scored rows of
    z_y - logsumexp_{j != y} z_j, d f / d z_y = 1 and d f / d z_j = -exp(z_j - logsumexp_{k != y}
    z_k) on scored rows, 0 elsewhere. The same arithmetic as `margins_and_q` (max-shifted
    log-sum-exp over the other tokens), so both paths agree to float rounding.
    """
    y = y[:, None]
    z_y = z.gather(1, y).squeeze(1)
    z.scatter_(1, y, float("-inf"))
    top = z.amax(1, keepdim=True)
    z.sub_(top).exp_()
    total = z.sum(1, keepdim=True)
    margin = z_y - (top + total.log()).squeeze(1)
    weight = scored.to(z.dtype)[:, None]
    z.mul_(-weight / total)
    z.scatter_(1, y, weight)
    return margin


def _body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(body, head) when logits are exactly head(body(...).last_hidden_state), else None.

    Listed explicitly: other causal LMs may rescale or cap logits after the head.
    """
    if isinstance(model, GPTNeoXForCausalLM):
        return model.gpt_neox, model.get_output_embeddings()
    return None


class FactoredFeaturizer(GradientFeaturizer):
    """LoGra-style features from hooks on one batched forward/backward of sum_i f(z_i).

    The forward hook of each body layer stores P_in x_t [B, T, k_in]; a hook on the layer's
    output receives delta_t = d(sum_i f_i)/d y_t [B, T, out] and forms sum_t (P_out delta_t)
    (P_in x_t)^T per example with one batched matmul. The full gradient [B, out, in] is never
    built, and `autograd.grad` is asked only for the input embeddings, so weight gradients are
    skipped.

    The loss end is done by hand, in chunks of `_HEAD_CHUNK_ELEMENTS` logits: f, q and
    d f / d logits in closed form (`_margin_grad_`), then for a GPT-NeoX proxy d f / d hidden =
    (d f / d logits) W_head chunk by chunk, so the [B, L, V] logits are never held at once and
    the LM head's factors (hidden states and d f / d logits) are projected in the same chunks.
    Other models run their full forward and get d f / d logits as the backward's seed.
    """

    def _batch(self, model, layers, projs, input_ids, loss_mask, attention_mask):
        device = input_ids.device
        real = attention_mask[..., None].float()
        x_proj: dict[str, torch.Tensor] = {}
        feats: dict[str, torch.Tensor] = {}
        split = _body_and_head(model)
        head = model.get_output_embeddings() if split is not None else None
        head_proj = next((p for p in projs if layers[p.name] is head), None)
        embed_proj = next((p for p in projs if isinstance(layers[p.name], nn.Embedding)), None)

        def make_hook(proj: LayerProjection):
            def forward_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                if proj.name in x_proj or proj.name in feats:
                    raise RuntimeError(
                        f"layer {proj.name} ran twice in one forward; shared weights are not "
                        "supported by the factored featuriser"
                    )
                # Padded positions are zeroed here too; their output gradient is 0 already.
                # Projections are float32 also inside the model's bf16 autocast.
                with torch.autocast(device.type, enabled=False):
                    x_proj[proj.name] = (args[0].detach().float() @ proj.p_in.T) * real

                def grad_hook(delta: torch.Tensor) -> None:
                    delta_proj = delta.float() @ proj.p_out.T
                    feats[proj.name] = proj.project_factors(delta_proj, x_proj.pop(proj.name))

                output.register_hook(grad_hook)

            return forward_hook

        hooked = [p for p in projs if p is not head_proj and p is not embed_proj]
        handles = [layers[p.name].register_forward_hook(make_hook(p)) for p in hooked]
        try:
            embed = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
            inputs = model_inputs(attention_mask, embed.dtype)
            with self._autocast(device):
                if split is None:
                    out = model(inputs_embeds=embed, **inputs).logits
                else:
                    out = split[0](inputs_embeds=embed, **inputs).last_hidden_state
            with torch.no_grad():  # gradients of the loss end are formed by hand
                f, q, seed, head_feats = self._loss_end(out, head, head_proj, input_ids,
                                                        loss_mask)
            if head_feats is not None:
                feats[head_proj.name] = head_feats
            if hooked or embed_proj is not None:
                (delta,) = torch.autograd.grad(out, embed, grad_outputs=seed)
            if embed_proj is not None:
                # x_t is onehot(token): P_in x_t is the token's column of P_in
                x_emb = embed_proj.p_in.T[input_ids] * real
                feats[embed_proj.name] = embed_proj.project_factors(
                    delta.float() @ embed_proj.p_out.T, x_emb)
        finally:
            for h in handles:
                h.remove()
        missing = [p.name for p in projs if p.name not in feats]
        if missing:
            raise RuntimeError(f"no output gradient reached layers {missing}")
        return torch.cat([feats[p.name] for p in projs], dim=1), f, q

    def _loss_end(
        self,
        out: torch.Tensor,
        head: nn.Linear | None,
        head_proj: LayerProjection | None,
        input_ids: torch.Tensor,
        loss_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """f [B], q [B], d f / d out (the backward's seed) and the head's phi part (or None).

        out: logits [B, L, V] when head is None, else the hidden states [B, L, H] fed to head.
        Rows are positions; row (b, t) predicts token t + 1, and the last position of every
        example predicts nothing (it is treated as an unscored row).
        """
        b, length = input_ids.shape
        rows = out.detach().reshape(b * length, -1)
        y = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1).reshape(-1)
        scored = torch.cat([loss_mask[:, 1:], torch.zeros_like(loss_mask[:, :1])], 1).reshape(-1)
        vocab = rows.shape[1] if head is None else head.out_features
        seed = torch.empty_like(rows)
        margin = torch.empty(b * length, dtype=torch.float32, device=rows.device)
        if head_proj is not None:
            d_proj = rows.new_empty(b * length, head_proj.p_out.shape[0], dtype=torch.float32)
            x_proj = rows.new_empty(b * length, head_proj.p_in.shape[0], dtype=torch.float32)
        chunk = _HEAD_CHUNK_ELEMENTS if rows.device.type == "cpu" else _ACCELERATOR_CHUNK_ELEMENTS
        step = max(1, chunk // vocab)
        for start in range(0, b * length, step):
            sl = slice(start, start + step)
            if head is None:
                z = rows[sl].to(torch.float32, copy=True)
            else:
                with self._autocast(rows.device):
                    z = nn.functional.linear(rows[sl], head.weight, head.bias)
                z = z.float()
            margin[sl] = _margin_grad_(z, y[sl], scored[sl])
            if self.model_output == "log_prob":  # d log p / d z = (1 - p) d margin / d z
                z.mul_(torch.sigmoid(-margin[sl])[:, None])
            if head is None:
                seed[sl] = z
                continue
            with self._autocast(rows.device):
                seed[sl] = z @ head.weight
            if head_proj is not None:
                d_proj[sl] = z @ head_proj.p_out.T
                x_proj[sl] = rows[sl].float() @ head_proj.p_in.T
        weight = scored.to(torch.float32).view(b, length)
        margin = margin.view(b, length)
        if self.model_output == "log_prob":  # log p = -softplus(-margin)
            f = (-nn.functional.softplus(-margin) * weight).sum(1)
            q = torch.ones_like(f)
        else:
            f = (margin * weight).sum(1)
            q = (torch.sigmoid(-margin) * weight).sum(1) / weight.sum(1).clamp_min(1)
        head_feats = None
        if head_proj is not None:
            head_feats = head_proj.project_factors(d_proj.view(b, length, -1),
                                                   x_proj.view(b, length, -1))
        return f, q, seed.view_as(out), head_feats


class ExactFeaturizer(GradientFeaturizer):
    """Reference features from full per-example gradients (`functional_call` + `vmap(grad)`).

    `output` chooses what is done with the per-example gradient of each layer G [out, in]:
    'factored' gives vec(P_out G P_in^T) per layer (same layout as `FactoredFeaturizer`),
    'dense' projects the concatenated flat gradient with `dense` (a `DenseProjector`),
    'full' returns the unprojected flat gradient (D = sum out * in columns).
    """

    def __init__(
        self,
        projections: Sequence[LayerProjection],
        *,
        output: Literal["factored", "dense", "full"] = "factored",
        dense: DenseProjector | None = None,
        sketch: CountSketch | None = None,
        batch_size: int = 16,
        autocast_dtype: AutocastDtype = "float32",
        model_output: ModelOutput = "margin",
    ) -> None:
        super().__init__(projections, sketch=sketch, batch_size=batch_size,
                         autocast_dtype=autocast_dtype, model_output=model_output)
        if (output == "dense") != (dense is not None):
            raise ValueError("pass a DenseProjector exactly when output='dense'")
        if sketch is not None and output != "factored":
            raise ValueError("a sketch follows the factored layer projections: output='factored'")
        self.output = output
        self.dense = dense

    def _batch(self, model, layers, projs, input_ids, loss_mask, attention_mask):
        device = input_ids.device
        weights = {f"{p.name}.weight": layers[p.name].weight.detach() for p in projs}
        inputs = model_inputs(attention_mask, torch.float32)

        def margin_one(w, ids, scored, mask4, pos):
            with self._autocast(device):
                logits = functional_call(
                    model,
                    w,
                    args=(),
                    kwargs={"input_ids": ids[None], "attention_mask": mask4[None],
                            "position_ids": pos[None]},
                    strict=False,
                ).logits
            f, q = margins_and_q(logits, ids[None], scored[None], self.model_output)
            return f[0], (f[0], q[0])

        # torch.func.grad ignores an outer no_grad for its own inputs; the no_grad only stops
        # ordinary autograd from recording the (unused) graph of the other parameters.
        with torch.no_grad():
            grads, (f, q) = vmap(grad(margin_one, has_aux=True), in_dims=(None, 0, 0, 0, 0))(
                weights, input_ids, loss_mask, inputs["attention_mask"], inputs["position_ids"]
            )
        # an embedding's gradient is stored [V, H]; the projections take [H, V] (`layer_shape`)
        per_layer = [grads[f"{p.name}.weight"].transpose(1, 2)
                     if isinstance(layers[p.name], nn.Embedding) else grads[f"{p.name}.weight"]
                     for p in projs]
        if self.output == "factored":
            phi = torch.cat([p.project_gradient(g) for p, g in zip(projs, per_layer, strict=True)],
                            dim=1)
        else:
            phi = torch.cat([g.float().reshape(g.shape[0], -1) for g in per_layer], dim=1)
            if self.dense is not None:
                phi = self.dense.project(phi)
        return phi, f, q


def featurize(
    model: nn.Module,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    config: FeatureConfig,
    *,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> Features:
    """phi [N, d], q [N], f [N] for `input_ids` [N, L] under `model`, as `config` says.

    Both methods use the same seeded factored projection, so their phi agree to float
    tolerance; 'factored' is the fast path.
    """
    featurizer = make_featurizer(model, config, device=device)
    logger.info(
        "featurising %d examples with %s, d=%d over %d layers",
        input_ids.shape[0], config.method, featurizer.dim, len(featurizer.projections),
    )
    return featurizer(model, input_ids, loss_mask, attention_mask=attention_mask, device=device)


def make_featurizer(
    model: nn.Module, config: FeatureConfig, *, device: torch.device | str = "cpu"
) -> GradientFeaturizer:
    """The featuriser `config` describes, with projections for `model`'s layers (use its
    `batches` method to stream features of a large shard)."""
    projs = layer_projections(model, config, device=device)
    cls = FactoredFeaturizer if config.method == "factored" else ExactFeaturizer
    return cls(projs, sketch=make_sketch(projs, config, device=device),
               batch_size=config.batch_size, autocast_dtype=config.autocast_dtype,
               model_output=config.model_output)
