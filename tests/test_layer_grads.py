"""The per-layer gradient engine and the factored projection against explicit gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_attrib import AttributionTask
from hf_attrib.algorithm import (
    GradCosAttributor,
    GradDotAttributor,
    IFAttributorCG,
    TracInAttributor,
    TRAKAttributor,
)
from hf_attrib.func.factored_projection import FactoredProjector
from hf_attrib.func.layer_grads import LayerGradients, Side
from hf_attrib.func.utils import flatten_params, per_sample_grad, slice_batch, unflatten_params
from hf_attrib.integrations import task_from_pretrained
from tests.integrations_helpers import char_tokenizer, tiny_gpt2


class Mixed(nn.Module):
    """Every supported layer kind: Embedding (padding row), HF Conv1D on a sequence, a strided
    padded Conv2d, and a Linear; optionally a Linear tied to the embedding."""

    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.c1 = Conv1D(5, 6)
        self.lin = nn.Linear(5 + 12, 6)
        self.out = nn.Linear(6, 11, bias=False)
        if tied:
            self.out.weight = self.emb.weight

    def forward(self, ids, img):
        h = torch.tanh(self.c1(self.emb(ids))).mean(1)
        c = torch.tanh(self.conv(img)).flatten(1)
        return self.out(torch.tanh(self.lin(torch.cat([h, c], 1))))


def _batch(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 11, (n, 7), generator=g)
    ids[0, 3:] = 0  # padding tokens
    return ids, torch.randn(n, 2, 4, 4, generator=g), torch.randint(0, 11, (n,), generator=g)


def _setup(tied=False):
    torch.manual_seed(0)
    model = Mixed(tied).eval()
    layout = {n: p.detach() for n, p in model.named_parameters()}

    def loss(theta, batch):
        ids, img, y = batch
        out = torch.func.functional_call(model, unflatten_params(theta, layout), (ids, img))
        return F.cross_entropy(out, y)

    return model, layout, loss, flatten_params(layout)


def _explicit(layout, grads):
    out, start = {}, 0
    for name, p in layout.items():
        out[name] = grads[:, start:start + p.numel()].reshape(-1, *p.shape)
        start += p.numel()
    return out


def _engine_features(model, layout, loss, theta, batch, factor_dim, ensemble_id=0):
    engine = LayerGradients(model, list(layout))
    assert engine.uncovered == []
    proj = FactoredProjector(list(engine.blocks.values()), factor_dim, seed=3)
    out = torch.zeros(batch[0].shape[0], proj.proj_dim)
    engine.run(lambda: loss(theta, batch), batch[0].shape[0],
               lambda b, r, c: proj.accumulate(out, b, r, c, ensemble_id))
    return proj, out


@pytest.mark.parametrize("tied", [False, True])
def test_unprojected_engine_gives_the_exact_per_example_gradients(tied):
    model, layout, loss, theta = _setup(tied)
    batch = _batch()
    _, feats = _engine_features(model, layout, loss, theta, batch, factor_dim=1000)
    explicit = per_sample_grad(loss, theta, batch)
    # sides no larger than factor_dim are kept whole: the features are the flat gradients
    torch.testing.assert_close(feats, explicit, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tied", [False, True])
def test_factored_features_are_the_kronecker_projection_of_the_gradients(tied):
    model, layout, loss, theta = _setup(tied)
    batch = _batch()
    proj, feats = _engine_features(model, layout, loss, theta, batch, factor_dim=2,
                                   ensemble_id=4)
    grads = _explicit(layout, per_sample_grad(loss, theta, batch))
    torch.testing.assert_close(feats, proj.project_explicit(grads, 4), rtol=1e-4, atol=1e-6)
    # literally (P_r kron P_c) vec(G) for the conv weight: the matrix never built by the engine
    block = proj.blocks[[b.name for b in proj.blocks].index("conv.weight")]
    kron = torch.kron(proj.matrix(block, 0, 4), proj.matrix(block, 1, 4))
    got = feats[:, proj.slices["conv.weight"]]
    torch.testing.assert_close(got, grads["conv.weight"].reshape(5, -1) @ kron.t(),
                               rtol=1e-4, atol=1e-6)


def test_squared_norm_from_the_sides_is_exact():
    model, layout, loss, theta = _setup()
    batch = _batch()
    engine = LayerGradients(model, list(layout))
    norms = torch.zeros(5)
    engine.run(lambda: loss(theta, batch), 5,
               lambda b, r, c: norms.add_(FactoredProjector.squared_norm(r, c)))
    explicit = per_sample_grad(loss, theta, batch)
    torch.testing.assert_close(norms, (explicit ** 2).sum(1), rtol=1e-4, atol=1e-7)


def test_projection_matrices_are_seeded_per_block_side_and_member():
    model, layout, _, _ = _setup()
    blocks = list(LayerGradients(model, list(layout)).blocks.values())
    a, b = FactoredProjector(blocks, 2, seed=1), FactoredProjector(blocks, 2, seed=1)
    block = blocks[0]
    assert torch.equal(a.matrix(block, 1, 0), b.matrix(block, 1, 0))
    assert not torch.equal(a.matrix(block, 1, 0), a.matrix(block, 1, 1))
    assert not torch.equal(a.matrix(block, 1, 0), FactoredProjector(blocks, 2, 2).matrix(block, 1))


def test_a_width_budget_picks_the_largest_factor_dim_that_fits():
    model, layout, _, _ = _setup()
    blocks = list(LayerGradients(model, list(layout)).blocks.values())
    for budget in (8, 40, 100, 318, 10_000):
        k = FactoredProjector.factor_dim_for(blocks, budget)
        assert FactoredProjector.width_for(blocks, k) <= budget
        assert FactoredProjector.width_for(blocks, k + 1) > budget or k >= 18
    task = _mlp_task()
    attributor = TRAKAttributor(task, projector_kwargs={"proj_type": "factored", "proj_dim": 30})
    fns = task.functions(0)
    width = attributor._width(fns)  # [8, 5], [8], [3, 8], [3]: k=3 -> 24, k=4 -> 35 > 30
    assert width == 24 and attributor._factored_features(fns).projector.factor_dim == 3


def test_selection_and_unsupported_modules():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    engine = LayerGradients(model, ["0.weight", "1.weight", "2.bias"])
    assert list(engine.blocks) == ["0.weight", "2.bias"]
    assert engine.uncovered == ["1.weight"]
    grouped = nn.Conv2d(4, 4, 3, groups=2)
    assert LayerGradients(grouped, ["weight"]).uncovered == ["weight"]


# -- transformers models: padding, -100 labels ------------------------------------------------
def _gpt2_task(**kwargs):
    model = tiny_gpt2()
    return task_from_pretrained(model, "causal-lm", processor=char_tokenizer(), **kwargs)


def test_padding_and_ignored_labels_do_not_change_factored_features():
    task = _gpt2_task()
    tok = task.tokenizer
    texts = ["abcdefghij", "xyz"]
    padded = dict(tok(texts, padding=True, return_tensors="pt"))
    padded["labels"] = padded["input_ids"].masked_fill(padded["attention_mask"] == 0, -100)
    attributor = GradDotAttributor(task, projector_kwargs={"proj_type": "factored",
                                                           "factor_dim": 4})
    fns = task.functions(0)
    factored = attributor._factored_features(fns)
    both = factored(fns, padded, "loss")
    alone = dict(tok(texts[1:], return_tensors="pt"))
    alone["labels"] = alone["input_ids"].clone()
    torch.testing.assert_close(both[1:], factored(fns, alone, "loss"), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("padded", [True, False])
def test_gpt2_all_parameters_with_tied_head_match_explicit_gradients(padded):
    task = _gpt2_task()
    tok = task.tokenizer
    if padded:
        batch = dict(tok(["hello world", "abc"], padding=True, return_tensors="pt"))
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    else:  # no attention mask: GPT-2 embeds positions [1, T] shared by the whole batch
        ids = tok(["hello", "world"], return_tensors="pt")["input_ids"]
        batch = {"input_ids": ids, "labels": ids.clone()}
    fns = task.functions(0)  # every parameter: embeddings (tied head), Conv1D, LayerNorm
    engine = LayerGradients(task.model, list(fns.layout))
    assert engine.uncovered == []
    proj = FactoredProjector(list(engine.blocks.values()), 3)
    feats = torch.zeros(2, proj.proj_dim)
    engine.run(lambda: fns.loss(fns.theta, batch), 2,
               lambda b, r, c: proj.accumulate(feats, b, r, c))
    # one example at a time (GPT-2's pad-token check does not run under vmap)
    rows = [torch.func.grad(fns.loss)(fns.theta, slice_batch(batch, i, i + 1)) for i in range(2)]
    grads = _explicit(fns.layout, torch.stack(rows))
    torch.testing.assert_close(feats, proj.project_explicit(grads), rtol=1e-3, atol=1e-5)


# -- attributors ----------------------------------------------------------------------------
def _mlp_task(num_checkpoints=1):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    ckpts = []
    for _ in range(num_checkpoints):
        ckpts.append({k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()})

    def loss(params, batch):
        x, y = batch
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    return AttributionTask(loss, model, ckpts)


def _loaders(n=12, m=5):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n + m, 5, generator=g), torch.randint(0, 3, (n + m,), generator=g)
    data = list(zip(x, y, strict=True))
    train = torch.utils.data.DataLoader(data[:n], batch_size=5)
    test = torch.utils.data.DataLoader(data[n:], batch_size=5)
    return train, test


@pytest.mark.parametrize("cls", [GradDotAttributor, GradCosAttributor, TRAKAttributor])
def test_unprojected_factored_attributors_equal_explicit_gradients(cls):
    task = _mlp_task()
    train, test = _loaders()
    full = {"proj_type": "factored", "factor_dim": 64}  # every side kept whole: exact
    exact = cls(task, projector_kwargs={"proj_type": "identity"}).attribute(train, test)
    got = cls(task, projector_kwargs=full).attribute(train, test)
    torch.testing.assert_close(got, exact, rtol=1e-4, atol=1e-5)
    if cls is not TRAKAttributor:
        self_exact = cls(task, projector_kwargs={"proj_type": "identity"}).self_attribute(train)
        torch.testing.assert_close(cls(task, projector_kwargs=full).self_attribute(train),
                                   self_exact, rtol=1e-4, atol=1e-5)


def test_tracin_factored_projection_equals_projected_explicit_gradients():
    task = _mlp_task(num_checkpoints=2)
    train, test = _loaders()
    attributor = TracInAttributor(task, weight_list=[1.0, 1.0],
                                  projector_kwargs={"proj_type": "factored", "factor_dim": 3})
    scores = attributor.attribute(train, test)
    expected = torch.zeros_like(scores)
    for c in range(2):
        fns = task.functions(c)
        proj = attributor._factored_features(fns).projector

        def feats(loader, fns=fns, proj=proj, c=c):
            rows = [per_sample_grad(fns.loss, fns.theta, b) for b in loader]
            return proj.project_explicit(_explicit(fns.layout, torch.cat(rows)), c)

        expected -= feats(train) @ feats(test).t()
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)


def test_a_loss_that_is_not_a_mean_is_caught():
    task = _mlp_task()
    model = task.model

    def summed(params, batch):
        x, y = batch
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y,
                               reduction="sum")

    bad = AttributionTask(summed, model, task.checkpoints)
    train, test = _loaders()
    attributor = GradDotAttributor(bad, projector_kwargs={"proj_type": "factored"})
    with pytest.raises(ValueError, match="mean of independent per-example losses"):
        attributor.attribute(train, test)


def test_a_weight_read_outside_its_module_is_caught():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).eval()

    def loss(params, batch):
        x, y = batch
        h = torch.func.functional_call(model, params, (x,))
        return F.cross_entropy(h + x[:, :3] @ params["0.weight"][:3, :3], y)

    task = AttributionTask(loss, model, model.state_dict())
    train, _ = _loaders()
    with pytest.raises(ValueError, match="every use of a selected parameter"):
        GradDotAttributor(task, projector_kwargs={"proj_type": "factored"}).cache(train)


def test_factored_option_errors():
    task = _mlp_task()
    with pytest.raises(ValueError, match="not both"):
        TRAKAttributor(task, projector_kwargs={"proj_type": "factored", "proj_dim": 64,
                                               "factor_dim": 2})
    with pytest.raises(ValueError, match="factor_dim must be a positive int"):
        TRAKAttributor(task, projector_kwargs={"proj_type": "factored", "factor_dim": 0})
    with pytest.raises(ValueError, match="unknown option"):
        TRAKAttributor(task, projector_kwargs={"proj_type": "factored", "nnz": 2})
    with pytest.raises(ValueError, match="does not apply"):
        IFAttributorCG(task, projector_kwargs={"proj_type": "factored"})
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).eval()

    def loss(params, batch):
        return F.cross_entropy(torch.func.functional_call(model, params, (batch[0],)), batch[1])

    ln_task = AttributionTask(loss, model, model.state_dict())
    train, _ = _loaders()
    with pytest.raises(ValueError, match=r"\['1.weight', '1.bias'\] belong to other modules"):
        GradDotAttributor(ln_task, projector_kwargs={"proj_type": "factored"}).cache(train)
    drop = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5), nn.Linear(4, 3))
    drop_task = AttributionTask(loss, drop, drop.state_dict())
    drop[1].train()
    with pytest.raises(ValueError, match="eval mode"):
        GradDotAttributor(drop_task, projector_kwargs={"proj_type": "factored"}).cache(train)


# -- CUDA (pytest -m gpu) ------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("tied", [False, True])
def test_engine_on_cuda_matches_cpu(tied):
    model, layout, loss, theta = _setup(tied)
    batch = _batch()
    _, cpu = _engine_features(model, layout, loss, theta, batch, factor_dim=3)
    model.cuda()
    for name in layout:  # loss() reads the layout it was built with
        layout[name] = layout[name].cuda()
    batch_cuda = tuple(t.cuda() for t in batch)
    engine = LayerGradients(model, list(layout))
    proj = FactoredProjector(list(engine.blocks.values()), 3, seed=3, device="cuda")
    out = torch.zeros(5, proj.proj_dim, device="cuda")
    engine.run(lambda: loss(theta.cuda(), batch_cuda), 5,
               lambda b, r, c: proj.accumulate(out, b, r, c))
    torch.testing.assert_close(out.cpu(), cpu, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("cls", [GradDotAttributor, TRAKAttributor])
def test_factored_attributors_on_cuda_match_cpu(cls):
    task = _mlp_task()
    train, test = _loaders()
    kwargs = {"projector_kwargs": {"proj_type": "factored", "factor_dim": 4}}
    cpu = cls(task, **kwargs).attribute(train, test)
    gpu = cls(task, device="cuda", **kwargs).attribute(train, test)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-4)


def test_hf_trak_defaults_to_factored_where_the_engine_covers_the_layers():
    from transformers import ViTConfig, ViTForImageClassification

    task = _gpt2_task()
    assert task.attributor("trak").projector_kwargs == {"proj_dim": 2048,
                                                        "proj_type": "factored"}
    chosen = task.attributor("trak", projector_kwargs={"proj_dim": 64})
    assert chosen.projector_kwargs == {"proj_dim": 64}  # what the user asks for stays
    assert task.attributor("grad-dot").projector_kwargs is None  # exact gradients stay exact
    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
        image_size=8, patch_size=4, num_labels=3)).eval()
    # cls_token / position_embeddings are bare parameters no hooked module owns
    vit_task = task_from_pretrained(vit, "image-classification")
    assert vit_task.attributor("trak").projector_kwargs == {"proj_dim": 2048}
    last = task_from_pretrained(vit, "image-classification", layers="last:1")
    assert last.attributor("trak").projector_kwargs["proj_type"] == "factored"


# -- what the checks catch, and the less common layouts -------------------------------------
def test_a_token_mean_across_the_batch_is_caught_on_a_later_batch():
    """transformers' own outputs.loss averages tokens over the whole batch: per-example
    gradients are then scaled by each example's share of the tokens. A first batch of equal
    lengths hides it; the forward-only spot check of batch 1 does not."""
    model = tiny_gpt2()

    def hf_loss(params, batch):
        return torch.func.functional_call(model, params, (), batch).loss

    task = AttributionTask(hf_loss, model, model.state_dict())
    full = torch.randint(4, 30, (4, 8))
    padded = full.clone()
    labels = padded.clone()
    labels[0, 3:] = -100
    labels[1, 5:] = -100
    batches = [{"input_ids": full, "labels": full}, {"input_ids": padded, "labels": labels}]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    attributor = GradDotAttributor(task, projector_kwargs={"proj_type": "factored"})
    with pytest.raises(ValueError, match="not the mean"):
        attributor.cache(loader)


def test_a_layer_on_unbatched_positions_is_refused():
    class Positional(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Embedding(6, 4)
            self.out = nn.Linear(4, 3)

        def forward(self, x):  # positions [T] -> [T, 4], broadcast over the batch
            return self.out(x + self.pos(torch.arange(x.shape[1])))[:, 0]

    model = Positional().eval()

    def loss(params, batch):
        x, y = batch
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    task = AttributionTask(loss, model, model.state_dict())
    data = list(zip(torch.randn(10, 6, 4), torch.randint(0, 3, (10,)), strict=True))
    loader = torch.utils.data.DataLoader(data, batch_size=5)
    with pytest.raises(ValueError, match="leading size 6"):
        GradDotAttributor(task, projector_kwargs={"proj_type": "factored"}).cache(loader)


def test_exact_norms_when_positions_outnumber_the_weight():
    torch.manual_seed(0)
    r, c = torch.randn(3, 12, 2), torch.randn(3, 12, 3)  # T^2 = 144 > 2 x 3
    grads = torch.bmm(r.transpose(1, 2), c)
    got = FactoredProjector.squared_norm(Side(r, 2), Side(c, 3))
    torch.testing.assert_close(got, grads.pow(2).sum((1, 2)))
    torch.testing.assert_close(FactoredProjector.squared_norm(Side(r[:, :1], 2), Side(c[:, :1], 3)),
                               torch.bmm(r[:, :1].transpose(1, 2), c[:, :1]).pow(2).sum((1, 2)))


def test_a_budget_below_one_feature_per_parameter_is_refused():
    model, layout, _, _ = _setup()
    blocks = list(LayerGradients(model, list(layout)).blocks.values())
    with pytest.raises(ValueError, match="smallest factored width"):
        FactoredProjector.factor_dim_for(blocks, len(blocks) - 1)


def test_layernorm_over_two_dimensions_is_a_vector_block():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm([3, 4]), nn.Flatten(), nn.Linear(12, 2))
    model.eval()
    with torch.no_grad():
        model[1].weight.normal_()
    layout = {n: p.detach() for n, p in model.named_parameters()}

    def loss(theta, batch):
        x, y = batch
        out = torch.func.functional_call(model, unflatten_params(theta, layout), (x,))
        return F.cross_entropy(out, y)

    theta = flatten_params(layout)
    batch = (torch.randn(5, 3, 4), torch.randint(0, 2, (5,)))
    _, feats = _engine_features(model, layout, loss, theta, batch, factor_dim=100)
    torch.testing.assert_close(feats, per_sample_grad(loss, theta, batch), rtol=1e-4, atol=1e-6)


def test_training_mode_after_construction_is_refused():
    task = _mlp_task()
    train, _ = _loaders()
    attributor = GradDotAttributor(task, projector_kwargs={"proj_type": "factored"})
    attributor._width(task.functions(0))  # the engine is built (model in eval mode) ...
    task.model.train()  # ... then dropout would be switched on
    with pytest.raises(ValueError, match="put in training mode"):
        attributor.cache(train)
