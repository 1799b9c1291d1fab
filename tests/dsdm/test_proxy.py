"""Proxy construction, training on real text, determinism and pickle-free round trips."""

from __future__ import annotations

import itertools
import json
import logging

import pytest
import torch
from transformers import GPTNeoXForCausalLM

from dsdm.proxy import (
    ProxyConfig,
    TrainProgress,
    TrainResult,
    build_proxy,
    causal_lm_loss,
    check_trainable,
    load_proxy,
    lr_at,
    proxy_to_bytes,
    train_proxy,
    training_steps,
)


def test_build_is_seeded_and_leaves_global_rng(tiny_config: ProxyConfig) -> None:
    state = torch.get_rng_state()
    a, b = build_proxy(tiny_config), build_proxy(tiny_config)
    assert torch.equal(state, torch.get_rng_state())
    assert isinstance(a, GPTNeoXForCausalLM)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    c = build_proxy(tiny_config.model_copy(update={"seed": 1}))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_config_validates_and_is_json(tiny_config: ProxyConfig) -> None:
    d = json.loads(json.dumps(tiny_config.to_dict()))
    assert ProxyConfig.model_validate(d) == tiny_config
    with pytest.raises(ValueError):
        ProxyConfig(hidden_size=0)
    with pytest.raises(ValueError):
        ProxyConfig.model_validate({**d, "unknown_field": 1})
    with pytest.raises(ValueError, match="must divide"):
        build_proxy(ProxyConfig(hidden_size=30, num_heads=4))
    for field in ("lr", "weight_decay", "grad_clip"):
        with pytest.raises(ValueError, match=f"{field}\n.*finite number"):
            ProxyConfig(**{field: float("inf")})
    with pytest.raises(ValueError, match="finite number"):
        ProxyConfig(lr=float("nan"))


def test_lr_schedule_warms_up_then_decays() -> None:
    cfg = ProxyConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, 110, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_loss_falls_on_real_text(trained_tiny: TrainResult) -> None:
    losses = trained_tiny.losses
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    logging.getLogger(__name__).info("tiny proxy loss %.3f -> %.3f", first, last)
    # Uniform over 257 byte ids is ln(257) = 5.55 nats; 40 steps learn byte frequencies.
    assert first > 5.0
    assert last < first - 1.5


def test_same_seed_same_weights(
    tiny_config: ProxyConfig, tiny_train_data: tuple[torch.Tensor, torch.Tensor]
) -> None:
    ids, mask = tiny_train_data
    cfg = tiny_config.model_copy(update={"max_steps": 6})
    a, b = train_proxy(cfg, ids, mask), train_proxy(cfg, ids, mask)
    assert a.losses == b.losses
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values(),
                              strict=True):
        assert torch.equal(pa, pb), name
    c = train_proxy(cfg.model_copy(update={"seed": 1}), ids, mask)
    assert c.losses != a.losses


def test_checkpoints_along_training(
    tiny_config: ProxyConfig, tiny_train_data: tuple[torch.Tensor, torch.Tensor]
) -> None:
    ids, mask = tiny_train_data
    cfg = tiny_config.model_copy(update={"max_steps": 6})
    result = train_proxy(cfg, ids, mask, checkpoint_steps=[2, 6])
    assert sorted(result.checkpoints) == [2, 6]
    final = result.model.state_dict()
    for name, value in result.checkpoints[6].items():
        assert torch.equal(value, final[name].cpu()), name
    # an earlier checkpoint is the weights of a shorter run with the same schedule length
    assert any(not torch.equal(result.checkpoints[2][n], final[n]) for n in final)
    with pytest.raises(ValueError, match=r"outside this run's steps 1..6"):
        train_proxy(cfg, ids, mask, checkpoint_steps=[0, 7])


def test_progress_logging_and_callback(
    tiny_config: ProxyConfig,
    tiny_train_data: tuple[torch.Tensor, torch.Tensor],
    caplog: pytest.LogCaptureFixture,
) -> None:
    ids, mask = tiny_train_data
    seen: list[TrainProgress] = []
    cfg = tiny_config.model_copy(update={"max_steps": 5})
    with caplog.at_level(logging.INFO, logger="dsdm.proxy"):
        train_proxy(cfg, ids, mask, log_every=2, callback=seen.append)
    assert [p.step for p in seen] == [2, 4, 5]
    assert all(p.total_steps == 5 and p.tokens_per_s > 0 for p in seen)
    assert sum("tokens/s" in r.message for r in caplog.records) == 3


def test_epochs_bound_the_steps(
    tiny_config: ProxyConfig, tiny_train_data: tuple[torch.Tensor, torch.Tensor]
) -> None:
    ids = tiny_train_data[0][:20, :16]
    cfg = tiny_config.model_copy(update={"max_steps": None, "epochs": 2, "batch_size": 8})
    assert len(train_proxy(cfg, ids).losses) == 2 * 3 == training_steps(len(ids), cfg)


def test_a_pool_too_small_to_train_names_the_minimum() -> None:
    config = ProxyConfig(warmup_steps=20, batch_size=32, epochs=1)
    check_trainable(929, config, "the pool")  # ceil(929 / 32) = 30 = 20 warmup + 10 steps
    with pytest.raises(ValueError, match=r"the pool has 928 examples: 29 optimiser steps .* "
                                         r"needs at least 929 examples"):
        check_trainable(928, config, "the pool")
    check_trainable(465, config.model_copy(update={"epochs": 2}), "the pool")
    with pytest.raises(ValueError, match="raise max_steps to at least 30"):
        check_trainable(10_000, config.model_copy(update={"max_steps": 25}), "the pool")


def test_round_trip_through_bytes(trained_tiny: TrainResult, tiny_config: ProxyConfig,
                                  tiny_train_data: tuple[torch.Tensor, torch.Tensor]) -> None:
    blob = proxy_to_bytes(trained_tiny.model)
    assert isinstance(blob, bytes) and not blob.startswith(b"\x80")  # not a pickle
    config = json.loads(json.dumps(tiny_config.to_dict()))
    loaded = load_proxy(config, blob)
    ids = tiny_train_data[0][:4]
    with torch.no_grad():
        assert torch.equal(trained_tiny.model(ids).logits, loaded(ids).logits)


def test_load_is_strict(tiny_config: ProxyConfig, untrained_tiny: torch.nn.Module) -> None:
    other = tiny_config.model_copy(update={"num_layers": 3}).to_dict()
    with pytest.raises(RuntimeError, match="Missing key"):
        load_proxy(other, proxy_to_bytes(untrained_tiny))


def test_loss_ignores_unscored_tokens() -> None:
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    logp = torch.log_softmax(logits, -1)
    expected = -(logp[0, 0, ids[0, 1]] + logp[0, 1, ids[0, 2]] + logp[1, 0, ids[1, 1]]) / 3
    torch.testing.assert_close(causal_lm_loss(logits, ids, mask), expected)
