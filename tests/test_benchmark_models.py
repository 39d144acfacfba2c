"""Tests of hf_attrib.benchmark.models: sizes, training, Hub round trips, torch.func."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
)

from hf_attrib.benchmark.models import (
    IMPLEMENTED_PARAMETER_COUNTS,
    PARAMETER_COUNTS,
    LogisticRegressionConfig,
    LogisticRegressionModel,
    MLPConfig,
    MLPModel,
    MusicTransformerConfig,
    MusicTransformerForCausalLM,
    MusicTransformerModel,
    NanoGPTForCausalLM,
    ResNet9Config,
    ResNet9Model,
    causal_lm_loss,
    count_parameters,
    nanogpt_config,
)
from hf_attrib.benchmark.models.music_transformer import (
    RelativeSelfAttention,
    relative_logits_naive,
    skew,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Run these tiny models on one thread (restored afterwards).

    Multi-threaded convolutions on a busy machine spend seconds synchronising threads for
    models this small; one thread keeps every test well under its time budget.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Parameter counts (full-size configs; only counted)
# --------------------------------------------------------------------------------------------
FULL_SIZE: dict[str, Callable[[], nn.Module]] = {
    "mnist_lr": lambda: LogisticRegressionModel(LogisticRegressionConfig()),
    "mnist_mlp": lambda: MLPModel(MLPConfig()),
    "cifar2_resnet9": lambda: ResNet9Model(ResNet9Config(num_labels=2)),
    "cifar10_resnet9": lambda: ResNet9Model(ResNet9Config(num_labels=10)),
    "maestro_musictransformer": lambda: MusicTransformerForCausalLM(MusicTransformerConfig()),
    "shakespeare_nanogpt": lambda: NanoGPTForCausalLM(nanogpt_config(vocab_size=65)),
}


@pytest.mark.parametrize("setting", sorted(FULL_SIZE))
def test_parameter_count_matches_table3(setting: str) -> None:
    n = count_parameters(FULL_SIZE[setting]())
    assert n == IMPLEMENTED_PARAMETER_COUNTS[setting]
    assert abs(n - PARAMETER_COUNTS[setting]) <= 0.05 * PARAMETER_COUNTS[setting]


def test_parameter_count_details() -> None:
    assert count_parameters(LogisticRegressionModel(LogisticRegressionConfig(use_bias=True))) \
        == 7850
    # 388 events only (no end/pad tokens) is also within 5% of 13.3M.
    mt = MusicTransformerForCausalLM(
        MusicTransformerConfig(vocab_size=388, pad_token_id=None, eos_token_id=None)
    )
    n = count_parameters(mt)
    assert n == 13_801_860
    assert abs(n - 13.3e6) <= 0.05 * 13.3e6
    # NanoGPT's output layer shares the token embedding.
    gpt = NanoGPTForCausalLM(nanogpt_config(vocab_size=65))
    assert gpt.lm_head.weight is gpt.transformer.wte.weight


# --------------------------------------------------------------------------------------------
# Tiny versions of every family for the behavioural tests
# --------------------------------------------------------------------------------------------
@dataclass
class Case:
    """A tiny model of one family with a batch and the Auto class it loads with."""

    name: str
    build: Callable[[float], nn.Module]  # dropout -> model
    batch: Callable[[], dict[str, Tensor]]
    auto_class: Any
    lr: float
    load_kwargs: dict[str, Any] | None = None


def _image_batch(shape: tuple[int, ...], classes: int) -> Callable[[], dict[str, Tensor]]:
    def make() -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(1)
        return {"pixel_values": torch.randn(4, *shape, generator=g),
                "labels": torch.randint(0, classes, (4,), generator=g)}
    return make


def _token_batch(vocab: int, length: int = 12) -> Callable[[], dict[str, Tensor]]:
    def make() -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, vocab, (2, length), generator=g)
        return {"input_ids": ids, "labels": ids}
    return make


def _tiny_music(dropout: float) -> MusicTransformerForCausalLM:
    return MusicTransformerForCausalLM(MusicTransformerConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=32, dropout=dropout,
    ))


def _tiny_gpt(dropout: float) -> NanoGPTForCausalLM:
    return NanoGPTForCausalLM(nanogpt_config(
        vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=dropout,
    ))


CASES = [
    Case("lr", lambda p: LogisticRegressionModel(LogisticRegressionConfig()),
         _image_batch((1, 28, 28), 10), AutoModelForImageClassification, 1e-3),
    Case("mlp", lambda p: MLPModel(MLPConfig(dropout=p)),
         _image_batch((1, 28, 28), 10), AutoModelForImageClassification, 1e-3),
    Case("resnet9", lambda p: ResNet9Model(ResNet9Config(
             num_labels=10, dropout=p, stem_channels=4, hidden_sizes=(8, 8, 16))),
         _image_batch((3, 8, 8), 10), AutoModelForImageClassification, 1e-3),
    Case("music_transformer", _tiny_music, _token_batch(390), AutoModelForCausalLM, 3e-3),
    # The attention implementation is not saved in config.json: ask for eager again (what
    # nanogpt_config chose) to get bit-identical outputs; SDPA differs by float rounding.
    Case("nanogpt", _tiny_gpt, _token_batch(65), AutoModelForCausalLM, 3e-3,
         {"attn_implementation": "eager"}),
]
CASE_IDS = [c.name for c in CASES]


def _build(case: Case, dropout: float = 0.1) -> nn.Module:
    torch.manual_seed(0)
    return case.build(dropout)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_backward(case: Case) -> None:
    model = _build(case).train()
    batch = case.batch()
    out = model(**batch)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    # Positional call (x only) returns the output object; the logits are available.
    first = next(iter(batch.values()))
    assert model(first).logits.shape[0] == first.shape[0]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_training_steps_lower_the_loss(case: Case) -> None:
    model = _build(case, dropout=0.0).train()  # no dropout: the loss is a function of params
    batch = case.batch()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=case.lr)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = model(**batch).loss.item()
    assert any(not torch.equal(before[k], v) for k, v in model.named_parameters())
    assert final < losses[0]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_eval_mode_is_deterministic(case: Case) -> None:
    model = _build(case, dropout=0.5)
    batch = case.batch()
    model.eval()
    with torch.no_grad():
        a, b = model(**batch).logits, model(**batch).logits
    assert torch.equal(a, b)
    if case.name != "lr":  # everything else has dropout, active in train mode
        model.train()
        with torch.no_grad():
            assert not torch.equal(model(**batch).logits, a)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_save_pretrained_round_trip(case: Case, tmp_path: Any) -> None:
    model = _build(case).train()
    batch = case.batch()
    # One step so the batch-norm running statistics differ from their initial values.
    model(**batch).loss.backward()
    model.eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = case.auto_class.from_pretrained(tmp_path, **(case.load_kwargs or {}))
    assert type(loaded) is type(model)
    assert not loaded.training
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
        assert torch.equal(model(**batch).loss, loaded(**batch).loss)
    assert AutoConfig.from_pretrained(tmp_path).to_dict().keys() >= {"model_type"}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_per_example_gradients_with_vmap(case: Case) -> None:
    model = _build(case).eval()
    batch = {k: v[:2] for k, v in case.batch().items()}
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_fn(p: dict[str, Tensor], example: dict[str, Tensor]) -> Tensor:
        one = {k: v.unsqueeze(0) for k, v in example.items()}
        return functional_call(model, (p, buffers), (), one).loss

    grads = vmap(grad(loss_fn), in_dims=(None, 0))(params, batch)
    for i in range(2):
        model.zero_grad()
        model(**{k: v[i:i + 1] for k, v in batch.items()}).loss.backward()
        for name, p in model.named_parameters():
            assert grads[name].shape == (2, *p.shape)
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Registration and configs
# --------------------------------------------------------------------------------------------
def test_auto_registration(tmp_path: Any) -> None:
    for config in (LogisticRegressionConfig(), MLPConfig(), ResNet9Config()):
        model = AutoModelForImageClassification.from_config(config)
        assert type(model) is type(AutoModel.from_config(config))
        assert AutoConfig.for_model(config.model_type).__class__ is type(config)
    config = MusicTransformerConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                    intermediate_size=16, max_position_embeddings=8)
    assert isinstance(AutoModelForCausalLM.from_config(config), MusicTransformerForCausalLM)
    assert isinstance(AutoModel.from_config(config), MusicTransformerModel)
    # The body of a saved causal LM loads with AutoModel (lm_head dropped).
    torch.manual_seed(0)
    lm = MusicTransformerForCausalLM(config).eval()
    lm.save_pretrained(tmp_path)
    body = AutoModel.from_pretrained(tmp_path)
    ids = torch.randint(0, 390, (1, 8))
    with torch.no_grad():
        assert torch.equal(body(ids).last_hidden_state, lm.model(ids).last_hidden_state)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "hf_attrib_music_transformer"
    assert saved["max_position_embeddings"] == 8


def test_config_round_trip_keeps_fields(tmp_path: Any) -> None:
    config = ResNet9Config(num_labels=2, dropout=0.2, hidden_sizes=(8, 16, 32))
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, ResNet9Config)
    assert loaded.num_labels == 2 and loaded.dropout == 0.2
    assert loaded.hidden_sizes == [8, 16, 32] and loaded.strides == [1, 2, 2]
    mlp = MLPConfig(hidden_sizes=[32], num_labels=3)
    assert MLPModel(mlp).classifier.in_features == 32
    assert MLPModel(mlp).classifier.out_features == 3


def test_classifier_layer_names() -> None:
    for model in (LogisticRegressionModel(LogisticRegressionConfig()), MLPModel(MLPConfig()),
                  ResNet9Model(ResNet9Config(stem_channels=4, hidden_sizes=(4, 4, 8)))):
        assert isinstance(dict(model.named_modules())["classifier"], nn.Linear)
    mlp = MLPModel(MLPConfig())
    assert [m.p for m in mlp.dropouts] == [0.1, 0.1]
    resnet = ResNet9Model(ResNet9Config())
    n_dropout = sum(isinstance(m, nn.Dropout) for m in resnet.modules())
    n_conv = sum(isinstance(m, nn.Conv2d) for m in resnet.modules())
    assert n_dropout == n_conv == 10  # dropout after every convolution block


# --------------------------------------------------------------------------------------------
# Relative attention
# --------------------------------------------------------------------------------------------
def test_skew_equals_naive_relative_logits() -> None:
    torch.manual_seed(0)
    length, d = 7, 5
    q = torch.randn(2, 3, length, d)
    table = torch.randn(length, d)
    fast = skew(q @ table.T)
    naive = relative_logits_naive(q, table)
    lower = torch.ones(length, length, dtype=torch.bool).tril()
    torch.testing.assert_close(fast * lower, naive)
    # Explicit loops as the definition: S_ij = q_i . E[L-1+j-i], j <= i.
    for i in range(length):
        for j in range(i + 1):
            expected = q[..., i, :] @ table[length - 1 + j - i]
            torch.testing.assert_close(fast[..., i, j], expected)


@pytest.mark.parametrize("per_head", [False, True])
def test_relative_attention_matches_naive_attention(per_head: bool) -> None:
    torch.manual_seed(0)
    config = MusicTransformerConfig(hidden_size=16, num_attention_heads=4, intermediate_size=8,
                                    num_hidden_layers=1, max_position_embeddings=10,
                                    relative_embeddings_per_head=per_head)
    attn = RelativeSelfAttention(config).eval()
    nn.init.normal_(attn.rel_embeddings)
    assert attn.rel_embeddings.shape == (4 if per_head else 1, 10, 4)
    bsz, length, heads, hd = 2, 6, 4, 4
    x = torch.randn(bsz, length, 16)
    mask = torch.ones(bsz, length)
    mask[1, :2] = 0  # left padding in the second sequence
    out, weights = attn(x, mask, output_attentions=True)

    q = attn.q_proj(x).reshape(bsz, length, heads, hd).transpose(1, 2)
    k = attn.k_proj(x).reshape(bsz, length, heads, hd).transpose(1, 2)
    v = attn.v_proj(x).reshape(bsz, length, heads, hd).transpose(1, 2)
    table = attn.rel_embeddings.expand(heads, -1, -1)  # [H, L_max, hd]
    logits = torch.full((bsz, heads, length, length), -math.inf)
    for i in range(length):
        for j in range(i + 1):
            distance = j - i  # <= 0; row L_max - 1 + distance of the full table
            rel = (q[:, :, i] * table[:, 10 - 1 + distance]).sum(-1)
            logit = ((q[:, :, i] * k[:, :, j]).sum(-1) + rel) / math.sqrt(hd)
            logits[:, :, i, j] = torch.where(mask[:, j, None].bool(), logit, -math.inf)
    expected_weights = logits.softmax(-1).nan_to_num(0.0)
    valid = expected_weights.sum(-1) > 0  # query rows with at least one visible key
    torch.testing.assert_close(weights[valid], expected_weights[valid])
    expected = attn.o_proj((expected_weights @ v).transpose(1, 2).reshape(bsz, length, 16))
    torch.testing.assert_close(out[0], expected[0])
    torch.testing.assert_close(out[1, 2:], expected[1, 2:])  # positions with a visible key
    # Padded keys get no attention at all.
    assert weights[1, :, 2:, :2].abs().max() == 0


def test_music_transformer_masks_and_loss() -> None:
    torch.manual_seed(0)
    model = _tiny_music(0.1).eval()
    ids = torch.randint(0, 388, (2, 10))
    with torch.no_grad():
        plain = model(ids).logits
        ones = model(ids, attention_mask=torch.ones_like(ids)).logits
        # Causality: a later token never changes earlier logits.
        changed = ids.clone()
        changed[:, 6:] = (changed[:, 6:] + 1) % 388
        later = model(changed).logits
    torch.testing.assert_close(plain, ones)
    torch.testing.assert_close(plain[:, :6], later[:, :6])
    assert not torch.allclose(plain[:, 6:], later[:, 6:])
    # Shifted labels, -100 ignored, as transformers causal LMs.
    labels = ids.clone()
    labels[0, 7:] = -100
    loss = model(ids, labels=labels).loss
    logp = plain.log_softmax(-1)
    terms = [-logp[b, t, labels[b, t + 1]] for b in range(2) for t in range(9)
             if labels[b, t + 1] != -100]
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    torch.testing.assert_close(causal_lm_loss(plain, labels), loss)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["maestro_musictransformer", "shakespeare_nanogpt"])
def test_full_size_per_example_gradients(setting: str) -> None:
    torch.manual_seed(0)
    model = FULL_SIZE[setting]().eval()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 32))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(p: dict[str, Tensor], one: Tensor) -> Tensor:
        return functional_call(model, p, (one[None],), {"labels": one[None]}).loss

    grads = vmap(grad(loss_fn), in_dims=(None, 0))(params, ids)
    model.zero_grad()
    model(ids[1:], labels=ids[1:]).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name][1], p.grad, rtol=1e-4, atol=1e-6)
