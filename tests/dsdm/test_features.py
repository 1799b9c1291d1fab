"""Gradient features on real text: the factored hooks against torch.func, torch.func against
plain backward passes, f and q against a direct computation, and invariances."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from dsdm import features
from dsdm.features import (
    ExactFeaturizer,
    FactoredFeaturizer,
    FeatureConfig,
    UnsupportedLayerError,
    choose_layer_dims,
    featurised_layers,
    featurize,
    layer_projections,
    layer_shape,
    margins_and_q,
    model_inputs,
)
from dsdm.projection import DenseProjector
from dsdm.proxy import TrainResult

PAD = 256  # the byte-level pad id of the fixtures
logger = logging.getLogger(__name__)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double().flatten(), b.double().flatten()]))[0, 1])


@pytest.fixture(scope="module")
def batch(demo_docs: list[dict], encode_bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """12 real documents cut to different lengths (so rows carry right padding)."""
    texts = [d["text"][: 20 + 4 * i] for i, d in enumerate(demo_docs[:12])]
    return encode_bytes(texts, 64)


def test_factored_equals_exact_with_same_projection(
    trained_tiny: TrainResult, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    model, (ids, mask) = trained_tiny.model, batch
    projs = layer_projections(model, FeatureConfig(target_dim=512, include_lm_head=True))
    fast = FactoredFeaturizer(projs, batch_size=5)(model, ids, mask)
    ref = ExactFeaturizer(projs, batch_size=3)(model, ids, mask)
    assert fast.phi.shape == (12, sum(p.dim for p in projs)) and fast.phi.dtype == torch.float32
    scale = ref.phi.abs().max()
    torch.testing.assert_close(fast.phi / scale, ref.phi / scale, rtol=0, atol=2e-5)
    torch.testing.assert_close(fast.q, ref.q)
    torch.testing.assert_close(fast.margin, ref.margin, rtol=1e-5, atol=1e-4)


def test_batch_size_is_speed_only(
    trained_tiny: TrainResult, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """The settings left out of a feature folder's fingerprint leave phi and q unchanged (to
    float rounding): batches of 3 and of 12 give the same features, the same identity."""
    model, (ids, mask) = trained_tiny.model, batch
    small, whole = FeatureConfig(target_dim=256, batch_size=3), FeatureConfig(target_dim=256, batch_size=12)
    assert small.identity() == whole.identity() and "batch_size" not in small.identity()
    assert small.identity() != FeatureConfig(target_dim=128, batch_size=3).identity()
    a, b = featurize(model, ids, mask, small), featurize(model, ids, mask, whole)
    scale = b.phi.abs().max()
    torch.testing.assert_close(a.phi / scale, b.phi / scale, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.q, b.q)


def test_factored_inner_products_track_full_gradients(
    trained_tiny: TrainResult, demo_docs: list[dict], encode_bytes
) -> None:
    model = trained_tiny.model
    ids, mask = encode_bytes([d["text"] for d in demo_docs[100:132]], 64)
    config = FeatureConfig(k_out=32, k_in=32, seed=3)
    projs = layer_projections(model, config)
    full = ExactFeaturizer(projs, output="full", batch_size=8)(model, ids, mask).phi
    phi = featurize(model, ids, mask, config).phi
    true, est = (full.double() @ full.double().T), (phi.double() @ phi.double().T)
    iu = torch.triu_indices(len(ids), len(ids))
    r = pearson(true[iu[0], iu[1]], est[iu[0], iu[1]])
    cos_t = true / true.diagonal().sqrt()[:, None] / true.diagonal().sqrt()[None]
    cos_e = est / est.diagonal().sqrt()[:, None] / est.diagonal().sqrt()[None]
    off = torch.triu_indices(len(ids), len(ids), offset=1)
    r_cos = pearson(cos_t[off[0], off[1]], cos_e[off[0], off[1]])
    norm_err = ((est.diagonal() - true.diagonal()) / true.diagonal()).abs().median()
    logger.info("JL: D=%d -> d=%d, Pearson(inner products)=%.4f, Pearson(cosines)=%.4f, "
                "median relative error of |g|^2 %.4f",
                full.shape[1], phi.shape[1], r, r_cos, norm_err)
    assert r >= 0.95, f"inner-product correlation {r:.4f}"
    assert r_cos >= 0.8, f"cosine correlation {r_cos:.4f}"


@pytest.mark.parametrize("model_output", ["margin", "log_prob"])
def test_sketched_factored_equals_sketched_exact(
    trained_tiny: TrainResult, batch: tuple[torch.Tensor, torch.Tensor], model_output: str
) -> None:
    model, (ids, mask) = trained_tiny.model, batch
    config = FeatureConfig(target_dim=256, factor_dim=16, include_lm_head=True,
                           include_embeddings=True, seed=4, model_output=model_output)
    fast = featurize(model, ids, mask, config)
    ref = featurize(model, ids, mask, config.model_copy(update={"method": "exact"}))
    assert fast.phi.shape == (12, 256)
    scale = ref.phi.abs().max()
    torch.testing.assert_close(fast.phi / scale, ref.phi / scale, rtol=0, atol=2e-5)
    torch.testing.assert_close(fast.q, ref.q)
    torch.testing.assert_close(fast.margin, ref.margin, rtol=1e-5, atol=1e-4)
    if model_output == "log_prob":
        assert torch.equal(fast.q, torch.ones(12)) and (fast.margin < 0).all()
    layers = featurised_layers(model, include_lm_head=True, include_embeddings=True)
    assert isinstance(next(iter(layers.values())), torch.nn.Embedding)
    for proj in layer_projections(model, config):  # sides of <= 16 are kept exact
        out_f, in_f = layer_shape(layers[proj.name])
        assert proj.p_out.shape[0] == min(16, out_f) and proj.p_in.shape[0] == min(16, in_f)
        if in_f <= 16:
            assert torch.equal(proj.p_in, torch.eye(in_f))


def test_sketch_tracks_full_gradients_better_than_small_factors(
    trained_tiny: TrainResult, demo_docs: list[dict], encode_bytes
) -> None:
    """At the same d, a wide Kronecker stage + CountSketch keeps inner products and cosines
    of the full per-example gradients better than per-layer factors summing to d. (The gap
    grows with the layers' width: the tiny model's are 32 wide, the demo proxy's 128.) The
    hidden layers only: the thresholds are for their D."""
    model = trained_tiny.model
    ids, mask = encode_bytes([d["text"] for d in demo_docs[100:140]], 64)
    layers = {"include_lm_head": False, "include_embeddings": False}
    projs = layer_projections(model, FeatureConfig(**layers))
    full = ExactFeaturizer(projs, output="full", batch_size=8)(model, ids, mask).phi.double()
    true = full @ full.T
    off = torch.triu_indices(len(ids), len(ids), offset=1)

    def cosine_agreement(config: FeatureConfig) -> float:
        phi = featurize(model, ids, mask, config).phi.double()
        est = phi @ phi.T
        cos_t = true / true.diagonal().sqrt()[:, None] / true.diagonal().sqrt()[None]
        cos_e = est / est.diagonal().sqrt()[:, None] / est.diagonal().sqrt()[None]
        return pearson(cos_t[off[0], off[1]], cos_e[off[0], off[1]])

    sketched = cosine_agreement(FeatureConfig(target_dim=512, seed=1, **layers))
    small = cosine_agreement(FeatureConfig(target_dim=512, sketch="none", seed=1, **layers))
    logger.info("cosine agreement at d=512 (D=%d): countsketch %.4f, small factors %.4f",
                full.shape[1], sketched, small)
    assert sketched >= 0.99, f"countsketch cosine agreement {sketched:.4f}"
    # at most half the disagreement (1 - Pearson) of the small factors
    assert 1 - sketched < 0.5 * (1 - small), f"countsketch {sketched:.4f}, small factors {small:.4f}"


def _flat_weight_grads(layers: dict[str, torch.nn.Module]) -> torch.Tensor:
    """The layers' .grad concatenated, an embedding's in the projections' [H, V] orientation."""
    return torch.cat([(m.weight.grad.T if isinstance(m, torch.nn.Embedding) else m.weight.grad)
                      .flatten() for m in layers.values()])


def test_log_prob_output_is_the_gradient_of_the_summed_log_likelihood(
    trained_tiny: TrainResult, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    model, (ids, mask) = trained_tiny.model, batch
    ids, mask = ids[:3], mask[:3]
    config = FeatureConfig(target_dim=64, include_lm_head=True, include_embeddings=True,
                           model_output="log_prob")
    projs = layer_projections(model, config)
    per_example = ExactFeaturizer(projs, output="full", batch_size=3,
                                  model_output="log_prob")(model, ids, mask).phi
    layers = featurised_layers(model, include_lm_head=True, include_embeddings=True)
    for i in range(len(ids)):
        model.zero_grad(set_to_none=True)
        logp = torch.log_softmax(model(ids[i : i + 1]).logits[:, :-1].float(), -1)
        picked = logp.gather(-1, ids[i : i + 1, 1:, None]).squeeze(-1)
        (picked * mask[i : i + 1, 1:]).sum().backward()
        loop = _flat_weight_grads(layers)
        torch.testing.assert_close(per_example[i], loop, rtol=1e-4, atol=1e-5)
    model.zero_grad(set_to_none=True)


def test_exact_gradients_equal_single_example_backward(
    trained_tiny: TrainResult, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    model, (ids, mask) = trained_tiny.model, batch
    ids, mask = ids[:4], mask[:4]
    config = FeatureConfig(target_dim=64, include_lm_head=True, include_embeddings=True)
    projs = layer_projections(model, config)
    per_example = ExactFeaturizer(projs, output="full", batch_size=4)(model, ids, mask).phi
    layers = featurised_layers(model, include_lm_head=True, include_embeddings=True)
    for i in range(len(ids)):
        model.zero_grad(set_to_none=True)
        f, _ = margins_and_q(model(ids[i : i + 1]).logits, ids[i : i + 1], mask[i : i + 1])
        f.sum().backward()
        loop = _flat_weight_grads(layers)
        torch.testing.assert_close(per_example[i], loop, rtol=1e-4, atol=1e-5)
    model.zero_grad(set_to_none=True)


def test_margin_and_q_equal_direct_computation(
    trained_tiny: TrainResult, task_rows: list[dict], encode_prompts
) -> None:
    model = trained_tiny.model
    ids, mask = encode_prompts(task_rows[:10], 64)  # only continuation bytes are scored
    feats = featurize(model, ids, mask, FeatureConfig(target_dim=64))
    with torch.no_grad():
        probs = torch.softmax(model(ids).logits.double(), -1)
    p = probs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    m = mask[:, 1:]
    f = torch.where(m, torch.log(p / (1 - p)), 0.0).sum(1)
    q = torch.where(m, 1 - p, 0.0).sum(1) / m.sum(1)
    torch.testing.assert_close(feats.margin.double(), f, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(feats.q.double(), q, rtol=1e-5, atol=1e-6)


def test_margins_are_stable_for_extreme_logits() -> None:
    logits = torch.tensor([[[1e4, 0.0, -1e4], [0.0, 0.0, 0.0], [-1e4, 1e4, 0.0]]])
    ids = torch.tensor([[0, 0, 2]])
    f, q = margins_and_q(logits, ids, torch.tensor([[False, True, True]]))
    # token 1: p ~ 1, margin 1e4; token 2: p = 1/3, margin log(1/2)
    torch.testing.assert_close(f, torch.tensor([1e4 + torch.log(torch.tensor(0.5)).item()]))
    torch.testing.assert_close(q, torch.tensor([(0.0 + 2 / 3) / 2]))
    f0, q0 = margins_and_q(logits, ids, torch.zeros(1, 3, dtype=torch.bool))
    assert f0.item() == 0.0 and q0.item() == 0.0


def test_closed_form_logit_gradient_equals_autograd() -> None:
    # The factored path forms f and d f / d logits by hand; margins_and_q + autograd is the
    # reference, including a token whose probability rounds to 1 in float32.
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(3, 7, 11, generator=gen)
    ids = torch.randint(0, 11, (3, 7), generator=gen)
    logits[0, 2, ids[0, 3]] = 1e4
    mask = torch.rand(3, 7, generator=gen) > 0.3
    mask[:, 0] = False
    mask[0, 3] = True
    ref = logits.clone().requires_grad_(True)
    f, _ = margins_and_q(ref, ids, mask)
    (grad,) = torch.autograd.grad(f.sum(), ref)
    z = logits[:, :-1].reshape(-1, 11).clone()
    margin = features._margin_grad_(z, ids[:, 1:].reshape(-1), mask[:, 1:].reshape(-1))
    torch.testing.assert_close((margin * mask[:, 1:].reshape(-1)).view(3, 6).sum(1), f)
    torch.testing.assert_close(z.view(3, 6, 11), grad[:, :-1])
    assert grad[:, -1].abs().max() == 0 and torch.isfinite(z).all()


def test_factored_loss_end_chunks_straddle_examples(
    trained_tiny: TrainResult, batch: tuple[torch.Tensor, torch.Tensor], monkeypatch
) -> None:
    model, (ids, mask) = trained_tiny.model, batch
    projs = layer_projections(model, FeatureConfig(target_dim=512, include_lm_head=True))
    ref = ExactFeaturizer(projs, batch_size=4)(model, ids, mask)
    # 37 rows of 257 logits per chunk: chunks end inside examples of 64 positions.
    monkeypatch.setattr(features, "_HEAD_CHUNK_ELEMENTS", 37 * 257)
    fast = FactoredFeaturizer(projs, batch_size=5)(model, ids, mask)
    scale = ref.phi.abs().max()
    torch.testing.assert_close(fast.phi / scale, ref.phi / scale, rtol=0, atol=2e-5)
    torch.testing.assert_close(fast.q, ref.q)
    torch.testing.assert_close(fast.margin, ref.margin, rtol=1e-5, atol=1e-4)


def test_factored_equals_exact_on_a_llama_model(demo_docs: list[dict], encode_bytes) -> None:
    # Models other than GPT-NeoX run their full forward and seed the backward with the
    # closed-form d f / d logits; the LM head is then featurised through its hooks.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        llama = LlamaForCausalLM(LlamaConfig(
            vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
            tie_word_embeddings=False, attn_implementation="eager",
        )).eval()
    ids, mask = encode_bytes([d["text"][: 30 + 3 * i] for i, d in enumerate(demo_docs[:9])], 64)
    attention = ids != PAD
    projs = layer_projections(llama, FeatureConfig(target_dim=512, include_lm_head=True,
                                                    include_embeddings=True))
    assert projs[0].name == "model.embed_tokens" and projs[-1].name == "lm_head"
    assert len(projs) == 16
    fast = FactoredFeaturizer(projs, batch_size=4)(llama, ids, mask, attention_mask=attention)
    ref = ExactFeaturizer(projs, batch_size=3)(llama, ids, mask, attention_mask=attention)
    scale = ref.phi.abs().max()
    torch.testing.assert_close(fast.phi / scale, ref.phi / scale, rtol=0, atol=2e-5)
    torch.testing.assert_close(fast.q, ref.q)
    torch.testing.assert_close(fast.margin, ref.margin, rtol=1e-5, atol=1e-4)


def test_featurising_restores_training_mode_and_requires_grad(
    trained_tiny: TrainResult, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    # Parameters are frozen while phi is computed (no weight gradients); the caller's
    # settings must come back, whichever they were.
    model, (ids, mask) = trained_tiny.model, batch
    embedding = model.get_input_embeddings().weight
    try:
        model.train()
        embedding.requires_grad_(False)
        before = {n: p.requires_grad for n, p in model.named_parameters()}
        featurize(model, ids[:3], mask[:3], FeatureConfig(target_dim=64))
        assert model.training
        assert {n: p.requires_grad for n, p in model.named_parameters()} == before
        assert not before["gpt_neox.embed_in.weight"] and before["lm_head.weight"]
    finally:
        model.eval()
        embedding.requires_grad_(True)


def test_phi_invariant_to_batch_size(
    trained_tiny: TrainResult, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    model, (ids, mask) = trained_tiny.model, batch
    projs = layer_projections(model, FeatureConfig(target_dim=256))
    one = FactoredFeaturizer(projs, batch_size=1)(model, ids, mask).phi
    many = FactoredFeaturizer(projs, batch_size=7)(model, ids, mask).phi
    torch.testing.assert_close(one, many, rtol=1e-4, atol=1e-4 * one.abs().max().item())
    streamed = list(FactoredFeaturizer(projs, batch_size=5).batches(model, ids, mask))
    assert [len(b.phi) for b in streamed] == [5, 5, 2]
    torch.testing.assert_close(torch.cat([b.phi for b in streamed]), many,
                               rtol=1e-4, atol=1e-4 * one.abs().max().item())


def test_phi_invariant_to_padding_position(
    trained_tiny: TrainResult, demo_docs: list[dict], encode_bytes
) -> None:
    model = trained_tiny.model
    ids, mask = encode_bytes([d["text"][:40] for d in demo_docs[:6]], 40)
    config = FeatureConfig(target_dim=256, include_lm_head=True)
    base = featurize(model, ids, mask, config).phi
    tol = {"rtol": 1e-4, "atol": 1e-4 * base.abs().max().item()}
    # Right padding with garbage tokens and no attention mask: causal attention ignores them.
    right_ids = torch.cat([ids, torch.randint(0, 256, (6, 24))], dim=1)
    right_mask = torch.cat([mask, torch.zeros(6, 24, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(featurize(model, right_ids, right_mask, config).phi, base, **tol)
    # Left padding needs the attention mask (and position ids counted from the first real token).
    left_ids = torch.cat([torch.full((6, 24), PAD), ids], dim=1)
    left_mask = torch.cat([torch.zeros(6, 24, dtype=torch.bool), mask], dim=1)
    attn = torch.cat([torch.zeros(6, 24, dtype=torch.bool), torch.ones(6, 40, dtype=torch.bool)], 1)
    for method in ("factored", "exact"):
        cfg = config.model_copy(update={"method": method})
        left = featurize(model, left_ids, left_mask, cfg, attention_mask=attn).phi
        torch.testing.assert_close(left, base, **tol)
    # ...and without it the features do change: the test can fail.
    unmasked = featurize(model, left_ids, left_mask, config).phi
    assert not torch.allclose(unmasked, base, **tol)


def test_bf16_autocast_accumulates_in_float32(
    trained_tiny: TrainResult, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    model, (ids, mask) = trained_tiny.model, batch
    config = FeatureConfig(target_dim=256)
    ref = featurize(model, ids, mask, config).phi
    low = featurize(model, ids, mask, config.model_copy(update={"autocast_dtype": "bfloat16"}))
    assert low.phi.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(ref, low.phi, dim=1)
    assert cos.min() > 0.95, cos


def test_dense_output_projects_the_full_gradient(
    trained_tiny: TrainResult, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    model, (ids, mask) = trained_tiny.model, batch
    projs = layer_projections(model, FeatureConfig(target_dim=64))
    full = ExactFeaturizer(projs, output="full")(model, ids, mask).phi
    dense = DenseProjector(full.shape[1], 128, seed=4)
    out = ExactFeaturizer(projs, output="dense", dense=dense)(model, ids, mask).phi
    torch.testing.assert_close(out, dense.project(full))
    with pytest.raises(ValueError, match="DenseProjector"):
        ExactFeaturizer(projs, output="dense")


def test_featurised_layers_and_unsupported_types(trained_tiny: TrainResult) -> None:
    model = trained_tiny.model
    names = list(featurised_layers(model, include_lm_head=False))
    assert len(names) == 8 and all(n.startswith("gpt_neox.layers.") for n in names)
    assert list(featurised_layers(model, include_lm_head=True))[-1] == "lm_head"
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedLayerError, match="Conv1D"):
        featurised_layers(gpt2, include_lm_head=False)


def test_choose_layer_dims_hits_target() -> None:
    shapes = {"a": (384, 128), "b": (128, 128), "c": (512, 128), "d": (128, 512), "e": (8, 4)}
    dims = choose_layer_dims(shapes, 4096)
    total = sum(o * i for o, i in dims.values())
    assert dims["e"] == (8, 4)  # capped by the layer's own size
    assert 0.75 * 4096 < total <= 1.1 * 4096
    assert all(o <= shapes[n][0] and i <= shapes[n][1] for n, (o, i) in dims.items())


def test_input_validation(
    trained_tiny: TrainResult, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    model, ids = trained_tiny.model, batch[0][:2, :8]
    bad = torch.ones(2, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="first token"):
        featurize(model, ids, bad, FeatureConfig(target_dim=64))
    mask = bad.clone()
    mask[:, 0] = False
    attn = torch.ones(2, 8, dtype=torch.bool)
    attn[:, -1] = False
    with pytest.raises(ValueError, match="padding"):
        featurize(model, ids, mask, FeatureConfig(target_dim=64), attention_mask=attn)


def test_model_inputs_mask_and_positions() -> None:
    attn = torch.tensor([[False, True, True]])
    out = model_inputs(attn, torch.float32)
    assert out["position_ids"].tolist() == [[0, 0, 1]]
    allowed = out["attention_mask"][0, 0] == 0
    assert allowed.tolist() == [[True, False, False], [False, True, False], [False, True, True]]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_features_match_cpu(
    trained_tiny: TrainResult, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    model, (ids, mask) = trained_tiny.model, batch
    config = FeatureConfig(target_dim=256)
    ref = featurize(model, ids, mask, config, device="cpu")
    fp32 = featurize(model, ids, mask, config, device="cuda")
    bf16 = featurize(model, ids, mask, config.model_copy(update={"autocast_dtype": "bfloat16"}),
                     device="cuda")
    model.to("cpu")
    scale = ref.phi.abs().max()
    torch.testing.assert_close(fp32.phi / scale, ref.phi / scale, rtol=0, atol=1e-4)
    assert torch.nn.functional.cosine_similarity(ref.phi, bf16.phi, dim=1).min() > 0.95


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_streamed_batches_match_cpu(
    trained_tiny: TrainResult, tiny_train_data: tuple[torch.Tensor, torch.Tensor]
) -> None:
    # On CUDA, inputs go through pinned memory and batch k is copied back while batch k + 1
    # runs; every batch must still arrive, in order, complete, on the CPU.
    model = trained_tiny.model
    ids, mask = tiny_train_data[0][:80], tiny_train_data[1][:80]
    projs = layer_projections(model, FeatureConfig(target_dim=512, include_lm_head=True))
    ref = FactoredFeaturizer(projs, batch_size=32)(model, ids, mask)
    try:
        streamed = list(FactoredFeaturizer(projs, batch_size=32).batches(model, ids, mask,
                                                                          device="cuda"))
    finally:
        model.to("cpu")
    assert [len(b.phi) for b in streamed] == [32, 32, 16]
    assert all(b.phi.device.type == "cpu" and b.phi.dtype == torch.float32 for b in streamed)
    phi = torch.cat([b.phi for b in streamed])
    scale = ref.phi.abs().max()
    torch.testing.assert_close(phi / scale, ref.phi / scale, rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.cat([b.q for b in streamed]), ref.q, rtol=1e-4, atol=1e-5)
