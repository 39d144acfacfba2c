"""K-FAC and EK-FAC influence against brute force: factors from explicit sides, eigenvalues from
the explicit Fisher, scores from explicitly built (damped) curvature matrices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hf_attrib import AttributionTask
from hf_attrib.algorithm import IFAttributorEKFAC, IFAttributorKFAC, make_attributor
from hf_attrib.algorithm.cache_store import CacheIntegrityError
from hf_attrib.func.kfac import KroneckerFactors
from hf_attrib.func.layer_grads import LayerGradients
from hf_attrib.func.utils import per_sample_grad


# --------------------------------------------------------------------------------------------
# Factors == brute-force covariances of the explicit sides
# --------------------------------------------------------------------------------------------
class Small(nn.Module):
    """Embedding (padding row), LayerNorm, Conv2d and Linear: every kind of side."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 3, padding_idx=0)
        self.ln = nn.LayerNorm(3)
        self.conv = nn.Conv2d(1, 2, 2)
        self.lin = nn.Linear(3 + 8, 4)

    def forward(self, ids, img, keep=None):
        e = self.emb(ids)
        c = self.conv(img)
        h = torch.cat([torch.tanh(self.ln(e.sum(1))), torch.tanh(c).flatten(1)], 1)
        out = self.lin(h)
        if keep is not None:
            keep.update(e=e, c=c, h=h, out=out)
        return out


def _small_data(n=5):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 6, (n, 4), generator=g)
    ids[0, 2:] = 0  # padding
    return ids, torch.randn(n, 1, 3, 3, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_factors_equal_brute_force_covariances():
    torch.manual_seed(0)
    model = Small().eval()
    ids, img, y = _small_data()
    n = ids.shape[0]
    engine = LayerGradients(model, [n for n, _ in model.named_parameters()])
    factors = KroneckerFactors(engine.blocks.values(), {"emb.weight"}, "cpu")
    factors.start_batch(n)
    model.requires_grad_(False)  # the engine's contract: no weight gradients
    engine.run(lambda: F.cross_entropy(model(ids, img), y), n, factors.visit)
    model.requires_grad_(True)
    factors.end_batch()
    got = {k: s.matrix for k, s in factors.sides.items()}

    # Brute force: each example's output gradients from autograd of the summed loss (examples
    # are independent), its sides built by hand.
    keep = {}
    loss = F.cross_entropy(model(ids, img, keep), y, reduction="sum")
    ge, gc, go = torch.autograd.grad(loss, [keep["e"], keep["c"], keep["out"]])
    d = torch.float64
    live = ids != 0  # the embedding's padding row never receives a gradient
    assert torch.allclose(got[("emb.weight", 0)],
                          torch.bincount(ids[live], minlength=6).to(d))
    assert torch.allclose(got[("emb.weight", 1)], (ge[live].T @ ge[live]).to(d), atol=1e-6)
    gcp = gc.flatten(2).transpose(1, 2).reshape(-1, 2)  # [n * positions, out channels]
    patches = F.unfold(img, 2).transpose(1, 2).reshape(-1, 4)
    assert torch.allclose(got[("conv.weight", 0)], (gcp.T @ gcp).to(d), atol=1e-6)
    assert torch.allclose(got[("conv.weight", 1)], (patches.T @ patches).to(d), atol=1e-5)
    assert torch.allclose(got[("lin.weight", 0)], (go.T @ go).to(d), atol=1e-6)
    assert torch.allclose(got[("lin.weight", 1)], (keep["h"].T @ keep["h"]).to(d), atol=1e-5)
    # vector blocks: the covariance of the explicit per-example gradients
    for name, p in model.named_parameters():
        if p.dim() == 1:
            grads = torch.stack([torch.autograd.grad(
                F.cross_entropy(model(ids[i:i + 1], img[i:i + 1]), y[i:i + 1]), p)[0]
                for i in range(n)])
            assert torch.allclose(got[(name, 0)], (grads.T @ grads).to(d), atol=1e-6), name
    positions = dict(zip([b.name for b in factors.blocks], factors.counts[1:].tolist()))
    assert factors.examples == n
    assert positions["emb.weight"] == int(live.sum())
    assert positions["conv.weight"] == 4 * n and positions["lin.weight"] == n
    # eigendecompositions reconstruct the factors; the one-hot side stays diagonal
    eig = factors.eigen()
    assert eig["emb.weight"].rows.basis is None
    lin = eig["lin.weight"].cols
    assert torch.allclose(lin.basis @ torch.diag(lin.values) @ lin.basis.T,
                          got[("lin.weight", 1)], atol=1e-6)


def test_factors_refuse_a_huge_dense_side():
    engine = LayerGradients(nn.Linear(3, 20000), ["weight"])
    with pytest.raises(ValueError, match="Leave that parameter out"):
        KroneckerFactors(engine.blocks.values(), set(), "cpu")


# --------------------------------------------------------------------------------------------
# Attributors against the explicit Fisher
# --------------------------------------------------------------------------------------------
def _mlp_problem(n=24, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).eval()
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    xt, yt = torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g)

    def loss(params, batch):
        return F.cross_entropy(torch.func.functional_call(model, params, (batch[0],)), batch[1])

    def margin(params, batch):
        logp = torch.log_softmax(torch.func.functional_call(model, params, (batch[0],)), -1)
        return logp.gather(1, batch[1][:, None]).mean()

    task = AttributionTask(loss, model, model.state_dict(), target_func=margin)
    train = DataLoader(TensorDataset(x, y), batch_size=7)
    test = DataLoader(TensorDataset(xt, yt), batch_size=5)
    return task, train, test, (x, y), (xt, yt)


def _explicit_grads(task, batch, target=False):
    fns = task.functions(0)
    return per_sample_grad(fns.target if target else fns.loss, fns.theta, batch).double()


def _kron_basis(attributor, name):
    """``Q = Q_R kron Q_C`` (or ``Q``) of a block, from the attributor's fitted rotation."""
    bases = attributor._rotation.bases(0)
    block = attributor._layers.blocks[name]
    rows = bases[(name, 0)]
    q_r = torch.eye(block.rows) if rows is None else rows.T
    if not block.is_matrix:
        return q_r.double()
    q_c = bases[(name, 1)].T
    return torch.kron(q_r, q_c).double()


def _curvature(attributor, grads, strategy, inputs, damped=True):
    """The block-diagonal damped curvature ``M`` the attributor claims to invert, built
    explicitly: EK-FAC ``Q diag(diag(Q^T F Q)) Q^T``, K-FAC ``R kron C / (n N)``, plus the
    per-block damping ``0.1 * mean eigenvalue`` (= 0.1 * trace / size)."""
    n = grads.shape[0]
    fisher = grads.T @ grads / n
    start, m = 0, torch.zeros_like(fisher)
    for name, p in attributor.task.model.named_parameters():
        size = p.numel()
        sl = slice(start, start + size)
        start += size
        q = _kron_basis(attributor, name)
        if strategy == "ekfac" or p.dim() == 1:  # a vector block's K-FAC is its exact Fisher
            e = torch.diagonal(q.T @ fisher[sl, sl] @ q)
            block = q @ torch.diag(e) @ q.T if strategy == "ekfac" else fisher[sl, sl]
        else:
            # R, C from the explicit sides of a one-position MLP: G_i = g_i a_i^T
            block = _kfac_block(grads[:, sl].reshape(n, *p.shape), inputs[name])
        damping = 0.1 * torch.trace(block) / size if damped else 0.0
        m[sl, sl] = block + damping * torch.eye(size, dtype=block.dtype)
    return m


def _kfac_block(g3, inputs):
    """``R kron C / n^2`` for per-example rank-one gradients ``G_i = g_i a_i^T`` (one position),
    with ``a_i`` the layer's explicit input and ``g_i = G_i a_i / |a_i|^2``."""
    n = g3.shape[0]
    inputs = inputs.double()
    outs = torch.einsum("noi,ni->no", g3, inputs) / (inputs * inputs).sum(1, keepdim=True)
    torch.testing.assert_close(torch.einsum("no,ni->noi", outs, inputs), g3)  # rank one
    return torch.kron(outs.T @ outs, inputs.T @ inputs) / n**2


@pytest.mark.parametrize("cls,strategy", [(IFAttributorEKFAC, "ekfac"),
                                          (IFAttributorKFAC, "kfac")])
def test_scores_equal_explicit_damped_inverse(cls, strategy):
    task, train, test, tr, te = _mlp_problem()
    attributor = cls(task, fisher="empirical")
    scores = attributor.attribute(train, test)
    grads, tgrads = _explicit_grads(task, tr), _explicit_grads(task, te, target=True)
    model, x = task.model, tr[0]
    with torch.no_grad():  # the explicit inputs of the MLP's two Linear layers
        inputs = {"0.weight": x, "2.weight": model[1](model[0](x))}
    m = _curvature(attributor, grads, strategy, inputs)
    expected = -(grads @ torch.linalg.solve(m, tgrads.T)) / grads.shape[0]
    torch.testing.assert_close(scores.double(), expected, rtol=2e-4,
                               atol=2e-4 * expected.abs().max())
    # the features are the gradients in the eigenbasis; EK-FAC's eigenvalues diag(Q^T F Q)
    fisher = grads.T @ grads / grads.shape[0]
    start = 0
    for name, p in task.model.named_parameters():
        sl = slice(start, start + p.numel())
        start += p.numel()
        q = _kron_basis(attributor, name)
        feats = attributor._train_cache[0][0][:, attributor._rotation.slices[name]].double()
        torch.testing.assert_close(feats, grads[:, sl] @ q, rtol=1e-4, atol=1e-6)
        if strategy == "ekfac":
            e = attributor._states[0][attributor._rotation.slices[name]]
            torch.testing.assert_close(e, torch.diagonal(q.T @ fisher[sl, sl] @ q),
                                       rtol=1e-4, atol=1e-9)
    self_scores = attributor.self_attribute(train)
    targets = _explicit_grads(task, tr, target=True)  # self-influence: own target gradient
    own = -torch.einsum("id,id->i", grads, torch.linalg.solve(m, targets.T).T) / grads.shape[0]
    torch.testing.assert_close(self_scores.double(), own, rtol=2e-4, atol=2e-4 * own.abs().max())


def test_global_damping_replaces_the_heuristic():
    task, train, test, tr, te = _mlp_problem()
    attributor = IFAttributorEKFAC(task, fisher="empirical", damping=0.05)
    scores = attributor.attribute(train, test)
    grads, tgrads = _explicit_grads(task, tr), _explicit_grads(task, te, target=True)
    fisher = grads.T @ grads / grads.shape[0]
    m, start = torch.zeros_like(fisher), 0
    for name, p in task.model.named_parameters():
        sl = slice(start, start + p.numel())
        start += p.numel()
        q = _kron_basis(attributor, name)
        m[sl, sl] = q @ torch.diag(torch.diagonal(q.T @ fisher[sl, sl] @ q)) @ q.T
    m += 0.05 * torch.eye(m.shape[0], dtype=m.dtype)
    expected = -(grads @ torch.linalg.solve(m, tgrads.T)) / grads.shape[0]
    torch.testing.assert_close(scores.double(), expected, rtol=2e-4,
                               atol=2e-4 * expected.abs().max())
    # damping is applied when scoring: changing it needs no new cache
    attributor.damping = None
    heuristic = attributor.attribute(train, test)
    assert not torch.allclose(heuristic, scores)


def test_kronecker_fisher_is_inverted_exactly():
    """One output, one position, a loss whose output gradient is +-1: the Fisher is exactly
    ``E[a a^T]`` = K-FAC = EK-FAC, so both equal the explicit damped inverse."""
    g = torch.Generator().manual_seed(3)
    x, s = torch.randn(30, 4, generator=g), torch.randint(0, 2, (30,), generator=g) * 2.0 - 1
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False).eval()

    def loss(params, batch):
        return (torch.func.functional_call(model, params, (batch[0],))[:, 0] * batch[1]).mean()

    task = AttributionTask(loss, model, model.state_dict())
    loader = DataLoader(TensorDataset(x, s), batch_size=8)
    grads = _explicit_grads(task, (x, s))
    fisher = grads.T @ grads / 30
    expected = -(grads @ torch.linalg.solve(fisher + 1e-2 * torch.eye(4, dtype=fisher.dtype),
                                            grads.T)) / 30
    for cls in (IFAttributorKFAC, IFAttributorEKFAC):
        scores = cls(task, fisher="empirical", damping=1e-2).attribute(loader, loader)
        torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-6)


def test_ekfac_is_closer_than_kfac_to_the_exact_fisher_inverse():
    """Against the explicit empirical Fisher of a small MLP: EK-FAC's curvature is nearer in
    Frobenius norm (a theorem: the best diagonal in the same eigenbasis), its scores nearer
    those of the exact block-diagonal inverse, and better correlated with those of the exact
    full inverse (cross-layer terms, which neither has, keep both far from it in norm)."""
    task, train, test, tr, te = _mlp_problem(n=60, seed=2)
    grads, tgrads = _explicit_grads(task, tr), _explicit_grads(task, te, target=True)
    n = grads.shape[0]
    fisher = grads.T @ grads / n
    eye = torch.eye(fisher.shape[0], dtype=fisher.dtype)
    diagonal_blocks, start = torch.zeros_like(fisher), 0
    for p in task.model.parameters():
        sl = slice(start, start + p.numel())
        start += p.numel()
        diagonal_blocks[sl, sl] = fisher[sl, sl]
    damping = 1e-2
    exact = -(grads @ torch.linalg.solve(fisher + damping * eye, tgrads.T)) / n
    exact_blocks = -(grads @ torch.linalg.solve(diagonal_blocks + damping * eye, tgrads.T)) / n
    block_error, correlation, frobenius = {}, {}, {}
    with torch.no_grad():
        inputs = {"0.weight": tr[0], "2.weight": task.model[1](task.model[0](tr[0]))}
    for cls, strategy in ((IFAttributorKFAC, "kfac"), (IFAttributorEKFAC, "ekfac")):
        attributor = cls(task, fisher="empirical", damping=damping)
        scores = attributor.attribute(train, test).double()
        block_error[strategy] = float((scores - exact_blocks).norm() / exact_blocks.norm())
        correlation[strategy] = float(torch.corrcoef(torch.stack([scores.flatten(),
                                                                   exact.flatten()]))[0, 1])
        curvature = _curvature(attributor, grads, strategy, inputs, damped=False)
        frobenius[strategy] = float((curvature - diagonal_blocks).norm())
    assert frobenius["ekfac"] < frobenius["kfac"], frobenius
    assert block_error["ekfac"] < 0.8 * block_error["kfac"], block_error
    assert correlation["ekfac"] > correlation["kfac"] > 0.85, correlation


# --------------------------------------------------------------------------------------------
# The true Fisher (sampled labels)
# --------------------------------------------------------------------------------------------
def test_true_fisher_uses_seeded_sampled_labels():
    task, train, _, tr, _ = _mlp_problem()
    model = task.model
    drawn = []

    checks = []

    def sampled(params, batch, generator):
        logits = torch.func.functional_call(model, params, (batch[0],))
        labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1,
                                   generator=generator)[:, 0]
        # the seed check calls it without gradients, twice, on the first batch
        (drawn if torch.is_grad_enabled() else checks).append(labels)
        return F.cross_entropy(logits, labels)

    attributor = IFAttributorEKFAC(task, sampled_loss_func=sampled, fisher_seed=5)
    attributor.cache(train)
    batches = len(train)
    assert len(drawn) == 2 * batches  # factor pass + eigenvalue pass, same seeds
    assert len(checks) == 2 and torch.equal(checks[0], drawn[0])
    labels = torch.cat(drawn[:batches])
    torch.testing.assert_close(labels, torch.cat(drawn[batches:]))
    assert not torch.equal(labels, tr[1])  # really sampled, not the training labels
    grads = _explicit_grads(task, (tr[0], labels))
    fisher = grads.T @ grads / grads.shape[0]
    start = 0
    for name, p in model.named_parameters():
        sl = slice(start, start + p.numel())
        start += p.numel()
        q = _kron_basis(attributor, name)
        e = attributor._states[0][attributor._rotation.slices[name]]
        torch.testing.assert_close(e, torch.diagonal(q.T @ fisher[sl, sl] @ q), rtol=1e-4,
                                   atol=1e-9)


def test_sampled_loss_drawing_from_the_global_rng_is_refused():
    task, train, *_ = _mlp_problem()
    model = task.model

    def global_rng(params, batch, generator):  # ignores the generator it is passed
        logits = torch.func.functional_call(model, params, (batch[0],))
        labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1)[:, 0]
        return F.cross_entropy(logits, labels)

    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"same seed \(checkpoint 0\): it must draw every "
                                         r"label with the generator it is passed.*"
                                         r"fisher='empirical'"):
        IFAttributorEKFAC(task, sampled_loss_func=global_rng).cache(train)


def test_sampled_loss_gets_the_checkpoints_fixed_parameters():
    """The fixed (unselected) parameters come from the functions' checkpoint, merged as
    task.functions merges them, not from whatever checkpoint the model holds now."""
    task, _, _, tr, _ = _mlp_problem()
    model = task.model
    second = {k: v.clone() for k, v in model.state_dict().items()}
    second["0.weight"] += 1.0  # differs only outside the selected layer
    task = AttributionTask(task.loss_func, model, [model.state_dict(), second])
    seen = []

    def sampled(params, batch, generator):  # the true labels: a deterministic "sample"
        seen.append(params["0.weight"].clone())
        return F.cross_entropy(torch.func.functional_call(model, params, (batch[0],)),
                               batch[1])

    attributor = IFAttributorEKFAC(task, sampled_loss_func=sampled, layer_name="2")
    fns = task.functions(0, "2")
    expected = fns.loss(fns.theta, (tr[0][:7], tr[1][:7]))
    task.load_checkpoint(1)  # the model now holds checkpoint 1
    got = attributor._fisher_loss(fns, (tr[0][:7], tr[1][:7]), 0)()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(seen[-1], task.checkpoints[0]["0.weight"], rtol=0, atol=0)


def test_true_fisher_without_a_sampled_loss_says_what_to_pass():
    task, *_ = _mlp_problem()
    with pytest.raises(ValueError, match="sampled_loss_func=f\\(params, batch, generator\\)"):
        IFAttributorEKFAC(task)
    with pytest.raises(ValueError, match="only with fisher='true'"):
        IFAttributorKFAC(task, fisher="empirical", sampled_loss_func=lambda p, b, g: 0)
    with pytest.raises(ValueError, match="fisher must be"):
        IFAttributorKFAC(task, fisher="exact")
    with pytest.raises(ValueError, match="damping must be > 0"):
        IFAttributorKFAC(task, fisher="empirical", damping=0.0)


def test_unsupported_layers_are_refused():
    class WithScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.scale = nn.Parameter(torch.ones(2))

        def forward(self, x):
            return self.lin(x) * self.scale

    model = WithScale().eval()
    task = AttributionTask(lambda p, b: torch.func.functional_call(model, p, (b[0],)).sum(),
                           model, model.state_dict())
    with pytest.raises(ValueError, match=r"\['scale'\] belong to other modules"):
        IFAttributorEKFAC(task, fisher="empirical")
    IFAttributorEKFAC(task, fisher="empirical", layer_name="lin")  # the fix works


def test_registry_builds_both_with_the_empirical_fisher():
    task, *_ = _mlp_problem()
    for name, cls in (("if-ekfac", IFAttributorEKFAC), ("if-kfac", IFAttributorKFAC)):
        attributor = make_attributor(name, task)
        assert type(attributor) is cls and attributor.fisher == "empirical"
        assert attributor.damping is None and attributor.damping_scale == 0.1


# --------------------------------------------------------------------------------------------
# Persistence
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [IFAttributorEKFAC, IFAttributorKFAC])
def test_save_load_scores_identically_without_refitting(cls, tmp_path, monkeypatch):
    task, train, test, *_ = _mlp_problem()
    first = cls(task, fisher="empirical")
    scores = first.attribute(train, test)
    first.save_cache(tmp_path / "c")

    def no_fit(*args, **kwargs):
        raise AssertionError("refitted")

    monkeypatch.setattr(cls, "_fit", no_fit)
    second = cls(task, fisher="empirical")
    second.load_cache(tmp_path / "c")
    torch.testing.assert_close(second.attribute(train, test), scores, rtol=0, atol=0)
    # features not kept in memory: recomputed in the saved eigenbasis, same scores
    third = cls(task, fisher="empirical", max_cache_bytes=0)
    third.load_cache(tmp_path / "c")
    torch.testing.assert_close(third.attribute(train, test), scores, rtol=1e-5, atol=1e-7)
    other = IFAttributorKFAC if cls is IFAttributorEKFAC else IFAttributorEKFAC
    with pytest.raises(ValueError, match="not built for this attributor"):
        other(task, fisher="empirical").load_cache(tmp_path / "c")


def test_missing_eigenbasis_in_a_cache_is_refused(tmp_path, monkeypatch):
    """A side's eigenbasis absent from a cache is not the identity: refused by name."""
    task, train, *_ = _mlp_problem()
    first = IFAttributorEKFAC(task, fisher="empirical")
    first.cache(train)
    state_tensors = IFAttributorEKFAC._state_tensors

    def without_one(self, index, state):
        tensors = state_tensors(self, index, state)
        del tensors["basis/2.weight/1"]
        return tensors

    monkeypatch.setattr(IFAttributorEKFAC, "_state_tensors", without_one)
    first.save_cache(tmp_path / "c")
    with pytest.raises(CacheIntegrityError, match=r"eigenbasis of 2.weight \(columns side\) is "
                                                  r"missing, not a 3 x 3 matrix"):
        IFAttributorEKFAC(task, fisher="empirical").load_cache(tmp_path / "c")


class _Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 3)
        self.lin = nn.Linear(3, 2)

    def forward(self, ids):
        return self.lin(torch.tanh(self.emb(ids).mean(1)))


def test_embedding_cache_round_trips_without_its_identity_basis(tmp_path):
    """An embedding's one-hot rows side has no basis (the identity): none is required."""
    torch.manual_seed(0)
    model = _Tokens().eval()
    g = torch.Generator().manual_seed(0)
    ids, y = torch.randint(0, 7, (12, 3), generator=g), torch.randint(0, 2, (12,), generator=g)

    def loss(params, batch):
        return F.cross_entropy(torch.func.functional_call(model, params, (batch[0],)), batch[1])

    task = AttributionTask(loss, model, model.state_dict())
    train = DataLoader(TensorDataset(ids, y), batch_size=5)
    test = DataLoader(TensorDataset(ids[:3], y[:3]), batch_size=3)
    first = IFAttributorEKFAC(task, fisher="empirical")
    scores = first.attribute(train, test)
    first.save_cache(tmp_path / "c")
    assert first._rotation.bases(0)[("emb.weight", 0)] is None
    second = IFAttributorEKFAC(task, fisher="empirical")
    second.load_cache(tmp_path / "c")
    torch.testing.assert_close(second.attribute(train, test), scores, rtol=0, atol=0)


# -- the true Fisher of transformers tasks -----------------------------------------------------
def _entropy_per_example(logits, mask):
    logp = torch.log_softmax(logits.float(), -1)
    entropy = -(logp.exp() * logp).sum(-1)
    return (entropy * mask).sum(-1) / mask.sum(-1)


def test_hf_sampled_loss_averages_to_the_predictive_entropy():
    """E_{y ~ p}[-log p(y)] is the entropy: the sampled labels follow the model's distribution
    at the positions that predict a counted token (causal shift, padding and -100 left out)."""
    from hf_attrib.integrations import task_from_pretrained
    from tests.integrations_helpers import char_tokenizer, tiny_gpt2

    task = task_from_pretrained(tiny_gpt2(), "causal-lm", processor=char_tokenizer())
    batch = dict(task.tokenizer(["hello world", "abc"], padding=True, return_tensors="pt"))
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[0, 4] = -100
    batch["labels"] = labels
    params = dict(task.model.named_parameters())
    generator = torch.Generator().manual_seed(0)
    repeated = {k: v.repeat(50, 1) for k, v in batch.items()}  # 50 draws per call
    with torch.no_grad():
        draws = torch.stack([task.sampled_loss_func(params, repeated, generator)
                             for _ in range(8)])
        logits = task.model(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).logits
    mask = (labels[:, 1:] != -100) & batch["attention_mask"][:, :-1].bool()
    expected = _entropy_per_example(logits[:, :-1], mask).mean()
    assert abs(float(draws.mean()) - float(expected)) < 4 * float(draws.std()) / 8 ** 0.5
    assert float(draws.std()) > 0  # labels really are drawn
    again = task.sampled_loss_func(params, batch, torch.Generator().manual_seed(0))
    first = task.sampled_loss_func(params, batch, torch.Generator().manual_seed(0))
    assert torch.equal(again, first)


def test_hf_task_true_fisher_ekfac_runs_through_the_task():
    from hf_attrib.integrations import task_from_pretrained
    from tests.integrations_helpers import char_tokenizer, text_datasets, tiny_gpt2

    task = task_from_pretrained(tiny_gpt2(), "causal-lm", processor=char_tokenizer(),
                                layers="last:1")
    train_ds, test_ds = text_datasets(n_train=6, duplicates=(1, 4))
    train, test = task.dataloader(train_ds, batch_size=3), task.dataloader(test_ds, batch_size=2)
    true = task.attributor("if-ekfac", fisher="true").attribute(train, test)
    empirical = task.attributor("if-ekfac", fisher="empirical").attribute(train, test)
    assert true.shape == (6, 2) and bool(torch.isfinite(true).all())
    assert not torch.allclose(true, empirical)
