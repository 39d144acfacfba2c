#!/usr/bin/env python
"""Runtime and peak memory of every attribution method, in the shape of the dattri paper's
Table 4: time of ``cache`` + ``attribute``, time of ``self_attribute``, peak memory.

It runs hf_attrib and, when ``dattri`` is importable in the same environment, the same cases
with dattri (written the way dattri's own API expects them: same data, same loaders, same
checkpoints, same hyperparameters, same thread count), and reports dattri time / hf_attrib
time for both columns.

Every (library, case, method) runs in a fresh Python process so that its peak memory
(``VmHWM`` of the child, i.e. peak resident set size) and its runtime are its own; models are
trained once per case by another child and saved as safetensors that the method children load
(training time is never counted). See ``recipes/speed/README.md``.

    python recipes/speed/bench_methods.py --quick               # ~1-2 min, hf_attrib only
    /work/venv-dattri/bin/python recipes/speed/bench_methods.py # both libraries, full sizes
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# Measure the hf_attrib of this checkout, whatever an editable install elsewhere points to.
if str(HERE.parents[1]) not in sys.path and (HERE.parents[1] / "hf_attrib").is_dir():
    sys.path.insert(0, str(HERE.parents[1]))
LIBS = ("hf_attrib", "dattri")
LAST_BLOCK = "transformer.h.{last}"  # the last transformer block (transformer.h.5 in full)

# --------------------------------------------------------------------------------------------
# Cases and methods. One set of hyperparameters per method, used by both libraries.
# --------------------------------------------------------------------------------------------
CASES: dict[str, dict[str, Any]] = {
    "mlp-digits": {
        # The paper-sized case is n_train=1000, n_test=100 (--n-train 1000 --n-test 100). dattri
        # recomputes the test-side inverse-HVPs once per training batch and solves against
        # every Hessian batch, so its IF cost grows with (n_train / batch)^2: 500 / 50 keeps a
        # full two-library run within ~25 minutes on 2 cores.
        "full": {"n_train": 500, "n_test": 50, "train_batch": 100, "test_batch": 50,
                 "epochs": 10, "lr": 0.1, "momentum": 0.9},
        "quick": {"n_train": 100, "n_test": 10, "train_batch": 50, "test_batch": 10,
                  "epochs": 10, "lr": 0.1, "momentum": 0.9},
    },
    "gpt2-10m": {
        # Brief size: n_train=64, n_test=16, batch 16 (--n-train 64 --n-test 16 --batch 16).
        "full": {"n_train": 32, "n_test": 8, "train_batch": 8, "test_batch": 8,
                 "seq_len": 64, "steps": 3, "lr": 1e-3},
        # --quick shrinks the model too (2 blocks of width 128); "last block" stays the target.
        "quick": {"n_train": 16, "n_test": 4, "train_batch": 8, "test_batch": 4,
                  "seq_len": 32, "steps": 3, "lr": 1e-3,
                  "gpt2": {"n_embd": 128, "n_layer": 2, "n_head": 4}},
    },
}

# method -> {"full": params, "quick": overrides}. "ckpts": checkpoints of the training
# trajectory (TracInCP); "models": independently trained models (TRAK ensembles).
METHODS: dict[str, dict[str, dict[str, Any]]] = {
    "mlp-digits": {
        # The full MLP has 17,226 parameters: an explicit Hessian of all of them is ~1.2 GB and
        # dattri rebuilds (and re-solves) it for every (train batch, test batch, Hessian batch)
        # triple, so both libraries run Explicit on the last Linear layer (650 parameters).
        "if-explicit": {"full": {"kind": "if-explicit", "layer": "fc3", "regularization": 1e-2}},
        "if-cg": {"full": {"kind": "if-cg", "max_iter": 10, "regularization": 1e-2},
                  "quick": {"max_iter": 5}},
        # The Hessian's most negative eigenvalue is -0.23: with regularization 1e-2 CG runs on
        # an indefinite system (a heuristic, as in the paper's set-up); 0.3 makes it positive
        # definite, where CG converges to the inverse-HVP and block CG applies.
        "if-cg-pd": {"full": {"kind": "if-cg", "max_iter": 10, "regularization": 0.3},
                     "quick": {"max_iter": 5}},
        # Accuracy, not iterations, matched (bench_cg_accuracy.py): 2 block-CG iterations reach
        # the self-influence error of 10 plain ones; 1 reaches 0.06, against 0.68 for dattri's
        # CG with 10 (its per-Hessian-batch solves, summed, are another estimator). dattri has
        # no block solver and runs its plain CG with 10 in both rows.
        "if-cg-block2": {"full": {"kind": "if-cg", "max_iter": 2, "regularization": 0.3,
                                  "block": True, "dattri": {"max_iter": 10}},
                         "quick": {"max_iter": 1, "dattri": {"max_iter": 5}}},
        "if-cg-block1": {"full": {"kind": "if-cg", "max_iter": 1, "regularization": 0.3,
                                  "block": True, "dattri": {"max_iter": 10}},
                         "quick": {"max_iter": 1, "dattri": {"max_iter": 5}}},
        "if-lissa": {"full": {"kind": "if-lissa", "recursion_depth": 100, "batch_size": 50,
                              "scaling": 50.0, "damping": 1e-3},
                     "quick": {"recursion_depth": 10, "batch_size": 25}},
        "if-arnoldi": {"full": {"kind": "if-arnoldi", "proj_dim": 50, "max_iter": 100,
                                "regularization": 1e-2},
                       "quick": {"proj_dim": 10, "max_iter": 20}},
        "tracin": {"full": {"kind": "tracin", "ckpts": 3, "proj_dim": 512}},
        "grad-dot": {"full": {"kind": "grad-dot", "proj_dim": 512}},
        "grad-cos": {"full": {"kind": "grad-cos", "proj_dim": 512}},
        "rps-l2": {"full": {"kind": "rps", "layer": "fc3", "l2_strength": 0.003}},
        # n_train > proj_dim: the kernel is invertible without regularization in both.
        "trak-1": {"full": {"kind": "trak", "models": 1, "proj_dim": 512, "regularization": 0.0},
                   "quick": {"proj_dim": 64}},
        "trak-5": {"full": {"kind": "trak", "models": 5, "proj_dim": 512, "regularization": 0.0},
                   "quick": {"proj_dim": 64}},
    },
    "gpt2-10m": {
        "trak": {"full": {"kind": "trak", "models": 1, "proj_dim": 512, "regularization": 1e-3,
                          "layer": LAST_BLOCK}},
        "grad-dot": {"full": {"kind": "grad-dot", "proj_dim": 512, "layer": LAST_BLOCK}},
        "grad-cos": {"full": {"kind": "grad-cos", "proj_dim": 512, "layer": LAST_BLOCK}},
        "tracin": {"full": {"kind": "tracin", "ckpts": 2, "proj_dim": 512,
                            "layer": LAST_BLOCK}},
        "if-cg": {"full": {"kind": "if-cg", "max_iter": 3, "regularization": 1e-2,
                           "layer": LAST_BLOCK}},
        "if-arnoldi": {"full": {"kind": "if-arnoldi", "proj_dim": 10, "max_iter": 20,
                                "regularization": 1e-2, "layer": LAST_BLOCK},
                       "quick": {"proj_dim": 5, "max_iter": 10}},
        "if-lissa": {"full": {"kind": "if-lissa", "recursion_depth": 10, "batch_size": 8,
                              "scaling": 50.0, "damping": 1e-3, "layer": LAST_BLOCK},
                     "quick": {"recursion_depth": 5, "batch_size": 4}},
    },
}

# Rows per dattri LiSSA self_attribute call (its vmapped recursion over 50 rows peaks near
# 11.6 GB on the digits MLP, as its attribute() does for 50 test rows).
DATTRI_LISSA_SELF_ROWS = 50

GPT2_CONFIG = {"vocab_size": 65, "n_positions": 256, "n_embd": 384, "n_layer": 6, "n_head": 6,
               "bos_token_id": 0, "eos_token_id": 0}


def method_params(case: str, method: str, quick: bool) -> dict[str, Any]:
    spec = METHODS[case][method]
    params = dict(spec["full"])
    if quick:
        params.update(spec.get("quick", {}))
    return params


def case_params(case: str, quick: bool, overrides: dict[str, int] | None = None
                ) -> dict[str, Any]:
    params = dict(CASES[case]["quick" if quick else "full"])
    params.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return params


# --------------------------------------------------------------------------------------------
# Models, data and the user functions (shared verbatim by both libraries)
# --------------------------------------------------------------------------------------------
def _torch():
    import torch

    return torch


def gpt2_config(info: dict) -> dict[str, Any]:
    return {**GPT2_CONFIG, **info.get("gpt2", {})}


def resolve_layer(mp: dict, info: dict) -> str | None:
    layer = mp.get("layer")
    if layer is None or "{last}" not in layer:
        return layer
    return layer.format(last=gpt2_config(info)["n_layer"] - 1)


def build_model(case: str, info: dict):
    torch = _torch()
    from torch import nn

    if case == "mlp-digits":
        class MLP(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.fc1 = nn.Linear(64, 128)
                self.fc2 = nn.Linear(128, 64)
                self.fc3 = nn.Linear(64, 10)
                self.drop = nn.Dropout(0.1)

            def forward(self, x):
                x = self.drop(torch.relu(self.fc1(x)))
                x = self.drop(torch.relu(self.fc2(x)))
                return self.fc3(x)

        return MLP()
    from transformers import GPT2Config, GPT2LMHeadModel

    # Eager attention for both libraries: the same function is differentiated either way
    # (hf_attrib would switch an SDPA model to eager by itself; dattri would not).
    config = GPT2Config(**gpt2_config(info))
    model = GPT2LMHeadModel(config)
    model.set_attn_implementation("eager")
    return model


def user_functions(case: str, model) -> dict[str, Any]:
    """``loss``, ``margin`` (TRAK's target) and ``prob`` (TRAK's correct probability).

    Written once, as a user of either library would: ``f(params, batch)``. The reshapes make
    them accept what each library passes: hf_attrib always passes a batch (of one for
    per-example gradients); dattri passes an unbatched example (TracIn, TRAK), a batch of one
    (IF gradients), a whole batch (Hessians), and float-cast labels/tokens (LiSSA).
    """
    torch = _torch()
    import torch.nn.functional as F
    from torch.func import functional_call

    if case == "mlp-digits":
        def logits_labels(params, batch):
            x, y = batch
            logits = functional_call(model, params, (x.reshape(-1, 64),))
            return logits, y.reshape(-1).long()

        def loss(params, batch):
            logits, y = logits_labels(params, batch)
            return F.cross_entropy(logits, y)

        def margin(params, batch):
            # log(p / (1 - p)) of the true class, averaged over the batch.
            logits, y = logits_labels(params, batch)
            correct = logits.gather(1, y[:, None])[:, 0]
            is_true = torch.arange(logits.shape[1], device=y.device) == y[:, None]
            others = logits.masked_fill(is_true, float("-inf"))
            return (correct - others.logsumexp(dim=1)).mean()

        def prob(params, batch):
            logits, y = logits_labels(params, batch)
            return logits.softmax(dim=1).gather(1, y[:, None]).mean()

        def rps_target(pre_activation, y):  # dattri's RPS target: f(logits, soft labels)
            return F.cross_entropy(pre_activation, y)

        return {"loss": loss, "margin": margin, "prob": prob, "rps_target": rps_target}

    def lm_loss(params, batch):
        x = batch[0]
        x = x.reshape(-1, x.shape[-1]).long()
        return functional_call(model, params, (x,), {"labels": x}).loss

    def margin(params, batch):
        # dattri's language-model TRAK output function: log p - log(1 - p), p = exp(-loss).
        logp = -lm_loss(params, batch)
        return logp - torch.log1p(-torch.exp(logp))

    def prob(params, batch):
        return torch.exp(-lm_loss(params, batch))

    return {"loss": lm_loss, "margin": margin, "prob": prob}


def prepare_case(case: str, quick: bool, workdir: Path, threads: int, seed: int,
                 overrides: dict[str, int] | None = None) -> dict:
    """Train the checkpoints of a case (not timed) and save data + checkpoints to workdir."""
    torch = _torch()
    from safetensors.torch import save_file

    torch.set_num_threads(threads)
    cp = case_params(case, quick, overrides)
    n_train, n_test = cp["n_train"], cp["n_test"]
    ckpts: dict[str, str] = {}
    info: dict[str, Any] = {"case": case, **cp}

    def save(model, name: str) -> None:
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        path = workdir / f"{case}-{name}.safetensors"
        save_file(state, str(path))
        ckpts[name] = str(path)

    if case == "mlp-digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        x_train, y_train = x[:n_train], y[:n_train]
        x_test, y_test = x[n_train:n_train + n_test], y[n_train:n_train + n_test]
        data = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
        epochs = cp["epochs"]
        trajectory = {max(1, round(epochs * k / 3)) for k in (1, 2, 3)}  # 3 TracIn checkpoints
        accs = []
        for model_seed in range(5):
            torch.manual_seed(seed + model_seed)
            model = build_model(case, info)
            opt = torch.optim.SGD(model.parameters(), lr=cp["lr"], momentum=cp["momentum"])
            gen = torch.Generator().manual_seed(seed + model_seed)
            for epoch in range(1, epochs + 1):
                model.train()
                order = torch.randperm(n_train, generator=gen)
                for start in range(0, n_train, cp["train_batch"]):
                    idx = order[start:start + cp["train_batch"]]
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
                    opt.step()
                if model_seed == 0 and epoch in trajectory and epoch != epochs:
                    save(model, f"traj-e{epoch}")
            save(model, f"model{model_seed}")
            model.eval()
            with torch.no_grad():
                accs.append(float((model(x_test).argmax(1) == y_test).float().mean()))
        info["test_accuracy"] = accs
        info["tracin_ckpts"] = [ckpts[f"traj-e{e}"] for e in sorted(trajectory) if e != epochs]
        info["tracin_ckpts"].append(ckpts["model0"])
        info["tracin_weights"] = [cp["lr"]] * len(info["tracin_ckpts"])
        info["models"] = [ckpts[f"model{s}"] for s in range(5)]
        info["n_params"] = sum(p.numel() for p in model.parameters())
    else:
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, GPT2_CONFIG["vocab_size"], (n_train + n_test, cp["seq_len"]),
                               generator=gen)
        data = {"x_train": tokens[:n_train], "x_test": tokens[n_train:]}
        torch.manual_seed(seed)
        model = build_model(case, info)
        save(model, "init")
        opt = torch.optim.AdamW(model.parameters(), lr=cp["lr"])
        model.train()
        for step in range(cp["steps"]):
            start = (step * cp["train_batch"]) % n_train
            batch = data["x_train"][start:start + cp["train_batch"]]
            opt.zero_grad()
            model(batch, labels=batch).loss.backward()
            opt.step()
        save(model, "final")
        info["tracin_ckpts"] = [ckpts["init"], ckpts["final"]]
        info["tracin_weights"] = [cp["lr"]] * 2
        info["models"] = [ckpts["final"]]
        info["n_params"] = sum(p.numel() for p in model.parameters())
        last = resolve_layer({"layer": LAST_BLOCK}, info)
        info["last_block"] = last
        info["n_params_layer"] = sum(p.numel() for n, p in model.named_parameters()
                                     if n.startswith(last + "."))
    save_file({k: v.contiguous() for k, v in data.items()}, str(workdir / f"{case}-data.safetensors"))
    info["data"] = str(workdir / f"{case}-data.safetensors")
    (workdir / f"{case}-info.json").write_text(json.dumps(info, indent=1))
    return info


# --------------------------------------------------------------------------------------------
# One (library, case, method) run: the child process
# --------------------------------------------------------------------------------------------
def _status_kb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return float("nan")


def _warm_up_torch_func() -> None:
    """Pay torch.func's one-time lazy imports (~2 s: the first grad pulls in torch._dynamo)
    before the clock starts; library-independent, identical for both libraries."""
    torch = _torch()

    def f(w, x):
        return (torch.tanh(x @ w) ** 2).sum()

    w, x = torch.randn(4, 3), torch.randn(5, 2, 4)
    torch.func.vmap(torch.func.grad(f), in_dims=(None, 0))(w, x)
    _, vjp_fn = torch.func.vjp(torch.func.grad(f), w, x[0])
    vjp_fn(w)
    torch.func.jvp(lambda v: torch.func.grad(f)(v, x[0]), (w,), (w,))
    torch.func.hessian(f)(w, x[0])


def _layer_params(model, layer: str | None) -> list[str] | None:
    """dattri's ``layer_name`` takes parameter names; hf_attrib's takes modules or parameters."""
    if layer is None:
        return None
    return [n for n, _ in model.named_parameters() if n == layer or n.startswith(layer + ".")]


def _checkpoints(info: dict, mp: dict) -> list[str]:
    kind = mp["kind"]
    if kind == "tracin":
        return info["tracin_ckpts"][-mp["ckpts"]:]
    if kind == "trak":
        return info["models"][:mp["models"]]
    return info["models"][:1]


def build_hf_attrib(case: str, mp: dict, model, fns: dict, ckpts: list, info: dict,
                    hf_proj_type: str):
    from hf_attrib.algorithm import (
        GradCosAttributor,
        GradDotAttributor,
        IFAttributorArnoldi,
        IFAttributorCG,
        IFAttributorExplicit,
        IFAttributorLiSSA,
        RPSAttributor,
        TracInAttributor,
        TRAKAttributor,
    )
    from hf_attrib.task import AttributionTask

    kind = mp["kind"]
    layer = mp.get("layer")
    layer_name = [layer] if layer else None
    proj = None
    if "proj_dim" in mp and kind not in ("if-arnoldi",):
        proj = {"proj_dim": mp["proj_dim"], "proj_seed": 0}
        if hf_proj_type != "auto":
            proj["proj_type"] = hf_proj_type
    if kind == "trak":
        task = AttributionTask(loss_func=fns["margin"], model=model, checkpoints=ckpts)
        return TRAKAttributor(task, correct_probability_func=fns["prob"], projector_kwargs=proj,
                              layer_name=layer_name, device="cpu",
                              regularization=mp["regularization"])
    task = AttributionTask(loss_func=fns["loss"], model=model, checkpoints=ckpts)
    if kind == "tracin":
        return TracInAttributor(task, weight_list=info["tracin_weights"][-mp["ckpts"]:],
                                normalized_grad=False, projector_kwargs=proj,
                                layer_name=layer_name, device="cpu")
    if kind == "grad-dot":
        return GradDotAttributor(task, projector_kwargs=proj, layer_name=layer_name,
                                 device="cpu")
    if kind == "grad-cos":
        return GradCosAttributor(task, projector_kwargs=proj, layer_name=layer_name,
                                 device="cpu")
    if kind == "rps":
        return RPSAttributor(task, final_linear_layer_name=layer, l2_strength=mp["l2_strength"],
                             normalize_preactivate=False, device="cpu")
    if kind == "if-explicit":
        return IFAttributorExplicit(task, layer_name=layer_name, device="cpu",
                                    regularization=mp["regularization"])
    if kind == "if-cg":
        return IFAttributorCG(task, layer_name=layer_name, device="cpu",
                              max_iter=mp["max_iter"], regularization=mp["regularization"],
                              block=mp.get("block", False))
    if kind == "if-lissa":
        return IFAttributorLiSSA(task, layer_name=layer_name, device="cpu",
                                 batch_size=mp["batch_size"],
                                 recursion_depth=mp["recursion_depth"],
                                 damping=mp["damping"], scaling=mp["scaling"])
    if kind == "if-arnoldi":
        return IFAttributorArnoldi(task, layer_name=layer_name, device="cpu",
                                   proj_dim=mp["proj_dim"], max_iter=mp["max_iter"],
                                   regularization=mp["regularization"])
    raise ValueError(kind)


def build_dattri(case: str, mp: dict, model, fns: dict, ckpts: list, info: dict):
    from dattri.algorithm import (
        IFAttributorArnoldi,
        IFAttributorCG,
        IFAttributorExplicit,
        IFAttributorLiSSA,
        RPSAttributor,
        TracInAttributor,
        TRAKAttributor,
    )
    from dattri.task import AttributionTask

    mp = {**mp, **mp.get("dattri", {})}  # dattri-side settings where a method has its own
    kind = mp["kind"]
    layer_name = _layer_params(model, mp.get("layer"))
    proj = {"proj_dim": mp["proj_dim"], "proj_seed": 0} if "proj_dim" in mp else None
    if kind == "trak":
        task = AttributionTask(loss_func=fns["margin"], model=model, checkpoints=ckpts)
        return TRAKAttributor(task, correct_probability_func=fns["prob"],
                              projector_kwargs=proj, layer_name=layer_name, device="cpu",
                              regularization=mp["regularization"])
    if kind == "rps":
        task = AttributionTask(loss_func=fns["loss"], model=model, checkpoints=ckpts,
                               target_func=fns["rps_target"])
        return RPSAttributor(task, final_linear_layer_name=mp["layer"],
                             l2_strength=mp["l2_strength"], normalize_preactivate=False,
                             device="cpu")
    task = AttributionTask(loss_func=fns["loss"], model=model, checkpoints=ckpts)
    if kind == "tracin":
        return TracInAttributor(task, weight_list=info["tracin_weights"][-mp["ckpts"]:],
                                normalized_grad=False, projector_kwargs=proj,
                                layer_name=layer_name, device="cpu")
    if kind in ("grad-dot", "grad-cos"):  # dattri: TracIn with one checkpoint and weight 1
        return TracInAttributor(task, weight_list=[1.0], normalized_grad=kind == "grad-cos",
                                projector_kwargs=proj, layer_name=layer_name, device="cpu")
    if kind == "if-explicit":
        return IFAttributorExplicit(task, layer_name=layer_name, device="cpu",
                                    regularization=mp["regularization"])
    if kind == "if-cg":
        return IFAttributorCG(task, layer_name=layer_name, device="cpu",
                              max_iter=mp["max_iter"], regularization=mp["regularization"])
    if kind == "if-lissa":
        return IFAttributorLiSSA(task, layer_name=layer_name, device="cpu",
                                 batch_size=mp["batch_size"],
                                 recursion_depth=mp["recursion_depth"],
                                 damping=mp["damping"], scaling=mp["scaling"])
    if kind == "if-arnoldi":
        return IFAttributorArnoldi(task, layer_name=layer_name, device="cpu",
                                   proj_dim=mp["proj_dim"], max_iter=mp["max_iter"],
                                   regularization=mp["regularization"])
    raise ValueError(kind)


def run_method(lib: str, case: str, method: str, quick: bool, workdir: Path, threads: int,
               hf_proj_type: str, result_path: Path, repeat: int = 1,
               repeat_budget_s: float = 20.0, warmup: bool = True,
               mem_limit_gb: float = 12.0) -> None:
    """Child process body: set up (untimed), then time cache, attribute, self_attribute."""
    result: dict[str, Any] = {"lib": lib, "case": case, "method": method, "status": "error"}
    if mem_limit_gb > 0:
        # A run that needs more fails with an allocation error (reported as n/a) instead of
        # waking the kernel's OOM killer on a machine other jobs share.
        import resource

        limit = int(mem_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        result["mem_limit_gb"] = mem_limit_gb

    def dump() -> None:
        result["peak_rss_mb"] = _status_kb("VmHWM") / 1024
        result_path.write_text(json.dumps(result, indent=1))

    try:
        torch = _torch()
        torch.set_num_threads(threads)
        from safetensors.torch import load_file
        from torch.utils.data import DataLoader, Subset, TensorDataset

        info = json.loads((workdir / f"{case}-info.json").read_text())
        mp = method_params(case, method, quick)
        if mp.get("layer"):
            mp["layer"] = resolve_layer(mp, info)
        result["params"] = mp
        data = load_file(info["data"])
        if case == "mlp-digits":
            train_set = TensorDataset(data["x_train"], data["y_train"])
            test_set = TensorDataset(data["x_test"], data["y_test"])
        else:
            train_set = TensorDataset(data["x_train"])
            test_set = TensorDataset(data["x_test"])
        train_loader = DataLoader(train_set, batch_size=info["train_batch"], shuffle=False)
        test_loader = DataLoader(test_set, batch_size=info["test_batch"], shuffle=False)
        model = build_model(case, info)
        model.eval()
        fns = user_functions(case, model)
        ckpts = [load_file(p) for p in _checkpoints(info, mp)]
        if lib == "dattri":
            import dattri

            result["version"] = getattr(dattri, "__version__", "0.3.0")
        else:
            import hf_attrib

            result["version"] = getattr(hf_attrib, "__version__", "?")
        _warm_up_torch_func()
        result["setup_rss_mb"] = _status_kb("VmRSS") / 1024

        kind = mp["kind"]

        def build(params: dict[str, Any] = mp):
            if lib == "hf_attrib":
                return build_hf_attrib(case, params, model, fns, ckpts, info, hf_proj_type)
            return build_dattri(case, params, model, fns, ckpts, info)

        def attribute_phase(params: dict[str, Any] = mp, train_loader: Any = train_loader,
                            test_loader: Any = test_loader) -> tuple[dict[str, float], Any]:
            c0, t0 = time.process_time(), time.perf_counter()
            attributor = build(params)
            t1 = time.perf_counter()
            if lib == "dattri" and kind in ("tracin", "grad-dot", "grad-cos"):
                attributor.cache()  # dattri's TracIn cache takes no loader (a no-op)
            else:
                attributor.cache(train_loader)
            t2 = time.perf_counter()
            if lib == "dattri" and kind == "trak":
                out = attributor.attribute(test_loader)  # dattri: (test, train=None), cached
            else:
                out = attributor.attribute(train_loader, test_loader)
            t3, c3 = time.perf_counter(), time.process_time()
            return {"init_s": t1 - t0, "cache_s": t2 - t1, "attribute_s": t3 - t2,
                    "cache_attribute_s": t3 - t0, "cache_attribute_cpu_s": c3 - c0}, out

        def self_phase() -> tuple[dict[str, float], Any]:
            # The self-influence of the training set from a fresh attributor, everything it
            # needs included (dattri's TRAK refuses self_attribute(loader) once cached and
            # self_attribute() without one, so only from-scratch numbers compare).
            c0, t0 = time.process_time(), time.perf_counter()
            attributor = build()
            if lib == "hf_attrib":
                attributor.cache(train_loader)
                out = attributor.self_attribute(train_loader)
            elif kind == "trak":
                out = attributor.self_attribute(train_loader)  # computes its own features
            elif kind in ("tracin", "grad-dot", "grad-cos"):
                attributor.cache()
                out = attributor.self_attribute(train_loader)
            else:
                # dattri 0.3.0's inner-product self_attribute adds each batch's values to the
                # whole output vector (`tda_output += values`), which fails unless the loader
                # is one batch: give it the same training set as a single batch (the Hessian
                # still comes from the cached train_loader).
                attributor.cache(train_loader)
                # dattri's LiSSA vmaps its whole recursion over the rows of a call: 500 rows
                # need far more than 12 GB, so it gets the rows in one-batch calls of
                # DATTRI_LISSA_SELF_ROWS (the same total work, as a user would have to).
                rows = DATTRI_LISSA_SELF_ROWS if kind == "if-lissa" else len(train_set)
                out = torch.cat([
                    attributor.self_attribute(DataLoader(
                        Subset(train_set, range(start, min(start + rows, len(train_set)))),
                        batch_size=rows, shuffle=False))
                    for start in range(0, len(train_set), rows)])
            t1, c1 = time.perf_counter(), time.process_time()
            return {"self_attribute_s": t1 - t0, "self_attribute_cpu_s": c1 - c0}, out

        def best_of(phase, key: str) -> tuple[dict[str, float], Any]:
            """Min wall time over up to `repeat` runs; short runs only (noise of other load)."""
            best, out = phase()
            walls = [best[key]]
            while len(walls) < repeat and sum(walls) < repeat_budget_s:
                gc.collect()
                times, out2 = phase()
                walls.append(times[key])
                if times[key] < best[key]:
                    best, out = times, out2
            best[key[:-2] + "_runs"] = walls
            return best, out

        if warmup and kind != "rps":
            # Untimed warm-up on one train batch and one test batch (the shapes of the real
            # run) with 2-3 solver iterations: the first execution of a code path in a process
            # is several times slower (kernel set-up, allocator growth), for both libraries.
            # Skipped for RPS, whose dattri fine-tuning cannot be shortened from outside.
            wmp = {k: v for k, v in mp.items() if k != "dattri"}  # warm-up caps hold for both
            for key, cap in (("recursion_depth", 2), ("max_iter", 3), ("proj_dim", 2)):
                if key in wmp and not (key == "proj_dim" and kind != "if-arnoldi"):
                    wmp[key] = min(wmp[key], cap)
            w_train = DataLoader(Subset(train_set, range(info["train_batch"])),
                                 batch_size=info["train_batch"], shuffle=False)
            w_test = DataLoader(Subset(test_set, range(info["test_batch"])),
                                batch_size=info["test_batch"], shuffle=False)
            w0 = time.perf_counter()
            try:
                attribute_phase(wmp, w_train, w_test)
                result["warmup"] = "ok"
            except Exception as exc:  # e.g. a singular one-batch TRAK kernel in dattri
                result["warmup"] = f"failed ({type(exc).__name__})"
            result["warmup_s"] = time.perf_counter() - w0
            gc.collect()
        result["attribute_started_at"] = time.time()
        dump()
        times, scores = best_of(attribute_phase, "cache_attribute_s")
        result.update(times, status="ok", scores_shape=list(scores.shape),
                      scores_finite=bool(torch.isfinite(scores).all()))
        torch.save(scores.detach().float().cpu(), result_path.with_suffix(".scores.pt"))
        dump()  # an attribute result survives a failing or timed-out self_attribute
        del scores
        gc.collect()
        if lib == "dattri" and kind == "rps":
            result["self_status"] = "n/a (dattri 0.3.0 RPSAttributor has no self_attribute)"
        else:
            result["self_started_at"] = time.time()
            dump()
            times, values = best_of(self_phase, "self_attribute_s")
            result.update(times, self_status="ok", self_shape=list(values.shape),
                          self_finite=bool(torch.isfinite(values).all()))
    except Exception as exc:  # reported in the table, never fatal for the benchmark
        where = "self_attribute" if result.get("status") == "ok" else "attribute"
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc):
            reason = f"out of memory: over the {mem_limit_gb:g} GB limit"
        if where == "self_attribute":
            result["self_status"] = f"n/a ({reason})"
        else:
            result["status"] = "error"
            result["reason"] = reason
        result["traceback"] = traceback.format_exc()[-4000:]
    dump()


# --------------------------------------------------------------------------------------------
# The parent: orchestration, timeouts, the table
# --------------------------------------------------------------------------------------------
def _spawn(cmd: list[str], log: Path, timeout: float, threads: int) -> tuple[str, float, float]:
    """Run a child; returns (outcome, wall seconds, ru_maxrss MB). outcome: ok/timeout/exit N."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["TQDM_DISABLE"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.perf_counter() - start > timeout:
                os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: only what we started
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = -9
                return "timeout", time.perf_counter() - start, usage.ru_maxrss / 1024
            time.sleep(0.05)
    outcome = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    return outcome, time.perf_counter() - start, usage.ru_maxrss / 1024


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.2f}" if x < 100 else f"{x:.0f}"


def _cell_time(res: dict | None, key: str, status_key: str | None = None) -> str:
    if res is None:
        return "-"
    if res.get("status") == "timeout" and res.get(key) is None:
        if status_key:  # self_attribute runs after attribute
            return "not run (attribute timed out)"
        return f"> {res['timeout_lower_s']:.0f} (timeout)"
    if res.get("status") != "ok":
        return f"n/a ({res.get('reason', res.get('status'))})"
    if status_key and res.get(status_key, "ok") != "ok":
        return res[status_key]
    return _fmt_s(res.get(key))


def _ratio(hf: dict | None, dt: dict | None, key: str, status_key: str | None = None) -> str:
    if hf is None or dt is None or hf.get(key) is None:
        return "-"
    if status_key and hf.get(status_key, "ok") != "ok":
        return "-"
    if dt.get(key) is not None and (status_key is None or dt.get(status_key, "ok") == "ok"):
        return f"{dt[key] / hf[key]:.1f}x"
    lower = dt.get("self_timeout_lower_s") if status_key else (
        dt.get("timeout_lower_s") if dt.get("status") == "timeout" else None)
    if status_key and dt.get("status") == "timeout":
        return "-"
    if lower is not None:
        return "timeout" if "cpu" in key else f"> {lower / hf[key]:.1f}x"
    return "n/a"


def _corr(workdir: Path, case: str, method: str) -> str:
    """Pearson r between the two libraries' attribute scores (same data, same checkpoints)."""
    import numpy as np

    paths = [workdir / "runs" / f"{lib}-{case}-{method}.scores.pt" for lib in LIBS]
    if not all(p.exists() for p in paths):
        return "-"
    try:
        torch = _torch()
        a, b = (torch.load(p).numpy().ravel() for p in paths)
    except Exception:
        return "-"
    if a.shape != b.shape or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return "-"
    if a.std() == 0 or b.std() == 0:
        return "-"
    return f"{float(np.corrcoef(a, b)[0, 1]):+.2f}"


def render_table(results: dict, cases: list[str], methods: dict[str, list[str]], libs: list[str],
                 workdir: Path) -> str:
    both = "dattri" in libs
    head = ["case", "method", "hf_attrib cache+attribute (s)"]
    if both:
        head += ["dattri cache+attribute (s)", "ratio"]
    head += ["hf_attrib self_attribute (s)"]
    if both:
        head += ["dattri self_attribute (s)", "ratio"]
    head += ["hf_attrib peak RSS (MB)"]
    if both:
        head += ["dattri peak RSS (MB)", "r(scores)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case in cases:
        for method in methods[case]:
            hf = results.get(("hf_attrib", case, method))
            dt = results.get(("dattri", case, method)) if both else None
            row = [case, method, _cell_time(hf, "cache_attribute_s")]
            if both:
                row += [_cell_time(dt, "cache_attribute_s"),
                        _ratio(hf, dt, "cache_attribute_s")]
            row += [_cell_time(hf, "self_attribute_s", "self_status")]
            if both:
                row += [_cell_time(dt, "self_attribute_s", "self_status"),
                        _ratio(hf, dt, "self_attribute_s", "self_status")]
            row += [f"{hf['peak_rss_mb']:.0f}" if hf and hf.get("peak_rss_mb") else "-"]
            if both:
                row += [f"{dt['peak_rss_mb']:.0f}" if dt and dt.get("peak_rss_mb") else "-",
                        _corr(workdir, case, method)]
            lines.append("| " + " | ".join(row) + " |")
    if both:
        lines += ["", "CPU-time ratios (dattri / hf_attrib process CPU time of the same phases; "
                  "less sensitive to other load on the machine than wall time):", "",
                  "| case | method | cache+attribute | self_attribute |", "|---|---|---|---|"]
        for case in cases:
            for method in methods[case]:
                hf = results.get(("hf_attrib", case, method))
                dt = results.get(("dattri", case, method))
                lines.append(f"| {case} | {method} | "
                             f"{_ratio(hf, dt, 'cache_attribute_cpu_s')} | "
                             f"{_ratio(hf, dt, 'self_attribute_cpu_s', 'self_status')} |")
    return "\n".join(lines)


def _environment(threads: int, libs: list[str]) -> dict[str, Any]:
    env: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                           "threads": threads, "libs": libs}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                env["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("torch", "transformers", "dattri", "hf-attrib"):
        with contextlib.suppress(PackageNotFoundError):
            env[pkg] = version(pkg)
    return env


def _dattri_available() -> tuple[bool, str]:
    from importlib.util import find_spec

    if find_spec("dattri") is None:
        return False, "dattri is not importable in this environment"
    return True, ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--methods", nargs="+", default=None,
                        help="subset of method names (any case); default: all")
    parser.add_argument("--libs", nargs="+", default=None, choices=LIBS,
                        help="default: hf_attrib, plus dattri when it is importable")
    parser.add_argument("--quick", action="store_true", help="small sizes: ~1-2 minutes")
    parser.add_argument("--n-train", type=int, default=None, help="override the case's size")
    parser.add_argument("--n-test", type=int, default=None, help="override the case's size")
    parser.add_argument("--batch", type=int, default=None, help="override the train batch size")
    parser.add_argument("--test-batch", type=int, default=None,
                        help="override the test batch size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per (library, case, method) child (default 120, quick 60)")
    parser.add_argument("--hf-proj-type", default="auto",
                        choices=["auto", "normal", "rademacher", "sparse"],
                        help="hf_attrib's projector for TracIn/Grad-*/TRAK (default: its own "
                             "default, 'auto' = sparse JL on CPU; dattri uses its default "
                             "dense normal)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="report the fastest of up to this many runs of each phase ...")
    parser.add_argument("--repeat-budget", type=float, default=8.0,
                        help="... repeating only while the runs so far took under this many "
                             "seconds (other load on the machine inflates single runs)")
    parser.add_argument("--mem-limit-gb", type=float, default=12.0,
                        help="address-space limit of each method process (0: none); a run "
                             "that needs more is reported as n/a (out of memory)")
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the untimed one-batch warm-up run of each method")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep checkpoints, logs and scores here (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--render-only", action="store_true",
                        help="with --workdir: only build the table from the finished runs there")
    parser.add_argument("--resume", action="store_true",
                        help="with --workdir: keep the finished runs found there (same sizes "
                             "and models) and run only the missing ones")
    # internal: child processes
    parser.add_argument("--_prepare", metavar="CASE", help=argparse.SUPPRESS)
    parser.add_argument("--_run", nargs=3, metavar=("LIB", "CASE", "METHOD"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--_result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = {"n_train": args.n_train, "n_test": args.n_test, "train_batch": args.batch,
             "test_batch": args.test_batch}

    if args._prepare:
        info = prepare_case(args._prepare, args.quick, args.workdir, args.threads, args.seed,
                            sizes)
        print(json.dumps({k: v for k, v in info.items() if k not in ("models", "tracin_ckpts")}))
        return 0
    if args._run:
        lib, case, method = args._run
        run_method(lib, case, method, args.quick, args.workdir, args.threads,
                   args.hf_proj_type, args._result, args.repeat, args.repeat_budget,
                   not args.no_warmup, args.mem_limit_gb)
        return 0

    timeout = args.timeout or (60.0 if args.quick else 120.0)
    have_dattri, why = _dattri_available()
    libs = args.libs or (["hf_attrib", "dattri"] if have_dattri else ["hf_attrib"])
    if "dattri" in libs and not have_dattri:
        parser.error(f"--libs dattri: {why}; see recipes/speed/README.md")
    if not have_dattri:
        print(f"[bench] {why}: running hf_attrib only (see recipes/speed/README.md)")
    methods = {c: [m for m in METHODS[c] if args.methods is None or m in args.methods]
               for c in args.cases}
    if args.methods:
        unknown = set(args.methods) - {m for c in CASES for m in METHODS[c]}
        if unknown:
            parser.error(f"unknown methods {sorted(unknown)}")

    tmp = None
    if args.render_only:
        args.resume = True
        if args.workdir is None:
            parser.error("--render-only needs --workdir")
    if args.workdir is None:
        tmp = tempfile.mkdtemp(prefix="hf_attrib_bench_")
        workdir = Path(tmp)
    else:
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "runs").mkdir(exist_ok=True)
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--workdir", str(workdir), "--threads", str(args.threads), "--seed",
              str(args.seed), "--hf-proj-type", args.hf_proj_type, "--repeat", str(args.repeat),
              "--repeat-budget", str(args.repeat_budget),
              "--mem-limit-gb", str(args.mem_limit_gb)] + (
                  ["--no-warmup"] if args.no_warmup else []) + (
                  ["--quick"] if args.quick else [])
    env_info = _environment(args.threads, libs)
    print(f"[bench] libs={libs} cases={args.cases} quick={args.quick} threads={args.threads} "
          f"timeout={timeout:.0f}s workdir={workdir}")
    results: dict[tuple[str, str, str], dict] = {}
    case_info: dict[str, Any] = {}
    t_start = time.perf_counter()
    try:
        for case in args.cases:
            if not methods[case]:
                continue
            log = workdir / f"prepare-{case}.log"
            size_args = [a for k, v in sizes.items() if v is not None
                         for a in (f"--{k.replace('_', '-').replace('train-batch', 'batch')}",
                                   str(v))]
            if args.resume and (workdir / f"{case}-info.json").exists():
                outcome, wall = "ok", 0.0  # reuse the checkpoints already there
            else:
                outcome, wall, _ = _spawn(me + common + size_args + ["--_prepare", case], log,
                                          1800, args.threads)
            if outcome != "ok":
                print(log.read_text()[-3000:])
                raise SystemExit(f"[bench] preparing {case} failed ({outcome}); log: {log}")
            case_info[case] = json.loads((workdir / f"{case}-info.json").read_text())
            acc = case_info[case].get("test_accuracy")
            print(f"[bench] prepared {case} in {wall:.1f}s (untimed): "
                  f"{case_info[case]['n_params']} params"
                  + (f", test accuracy {[round(a, 3) for a in acc]}" if acc else ""))
            for method in methods[case]:
                for lib in libs:
                    res_path = workdir / "runs" / f"{lib}-{case}-{method}.json"
                    if args.resume and res_path.exists():
                        done = json.loads(res_path.read_text())
                        if done.get("finished"):
                            results[(lib, case, method)] = done
                            print(f"[bench] {lib:9s} {case:10s} {method:10s} (from {res_path})")
                            continue
                    if args.render_only:
                        continue  # shown as "-": not run
                    log = res_path.with_suffix(".log")
                    cmd = me + common + ["--_run", lib, case, method, "--_result", str(res_path)]
                    load = os.getloadavg()[0]
                    outcome, wall, maxrss = _spawn(cmd, log, timeout, args.threads)
                    res = json.loads(res_path.read_text()) if res_path.exists() else {
                        "lib": lib, "case": case, "method": method, "status": "error"}
                    res["wall_s"] = wall
                    res["loadavg_1min_before"] = load
                    res["timeout_s"] = timeout
                    res["ru_maxrss_mb"] = maxrss
                    if outcome == "timeout":
                        killed_at = time.time()
                        if res.get("self_status") == "ok":
                            pass  # killed while exiting: both phases had finished
                        elif res.get("status") == "ok":  # attribute done, self_attribute cut
                            lower = killed_at - res.get("self_started_at", killed_at)
                            res["self_status"] = f"> {lower:.0f} (timeout)"
                            res["self_timeout_lower_s"] = lower
                        else:
                            res["status"] = "timeout"
                            res["timeout_lower_s"] = killed_at - res.get(
                                "attribute_started_at", killed_at - wall)
                        res["peak_rss_mb"] = res.get("peak_rss_mb") or maxrss
                    elif outcome != "ok" and res.get("status") != "ok":
                        tail = log.read_text()[-300:].strip().splitlines()
                        res["reason"] = res.get("reason") or (
                            f"{outcome}: {tail[-1] if tail else ''}"[:200])
                    res["finished"] = True
                    res_path.write_text(json.dumps(res, indent=1))
                    results[(lib, case, method)] = res
                    msg = (f"cache+attribute {_fmt_s(res.get('cache_attribute_s'))}s, "
                           f"self_attribute {_fmt_s(res.get('self_attribute_s'))}s, "
                           f"peak {res.get('peak_rss_mb') or 0:.0f} MB"
                           if res.get("status") == "ok" else
                           f"{res['status']}: {res.get('reason', '')}")
                    if res.get("status") == "ok" and res.get("self_status", "ok") != "ok":
                        msg += f" [self_attribute {res['self_status']}]"
                    print(f"[bench] {lib:9s} {case:10s} {method:10s} {msg}", flush=True)
        table = render_table(results, args.cases, methods, libs, workdir)
    finally:
        if tmp is not None and "table" not in locals():
            shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - t_start
    cmdline = " ".join([Path(sys.executable).as_posix(), *sys.argv])
    header = [
        f"# hf_attrib{' vs dattri' if 'dattri' in libs else ''}: method runtimes "
        f"({'quick' if args.quick else 'full'} sizes)",
        "",
        f"Command: `{cmdline}`  ",
        f"Date: {_dt.datetime.now().isoformat(timespec='seconds')}; total wall time "
        f"{total / 60:.1f} min; per-run timeout {timeout:.0f} s  ",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in env_info.items()),
        "",
        "Sizes: " + "; ".join(
            f"{c}: n_train={case_info[c]['n_train']}, n_test={case_info[c]['n_test']}, "
            f"train batch {case_info[c]['train_batch']}, test batch "
            f"{case_info[c]['test_batch']}, {case_info[c]['n_params']} params"
            + (f" ({case_info[c]['n_params_layer']} in {case_info[c]['last_block']}, the "
               "attributed layer)"
               if "n_params_layer" in case_info[c] else "")
            for c in case_info),
        "",
        "Times in seconds (time.perf_counter, checkpoint loading and model training excluded; "
        "cache+attribute includes building the attributor). self_attribute runs after "
        "cache+attribute on the same attributor. Peak RSS = VmHWM of the child process that "
        "ran the method (includes the Python/torch baseline). ratio = dattri time / hf_attrib "
        "time. r(scores) = Pearson correlation of the two libraries' attribute() scores "
        "(negative where the sign conventions differ: hf_attrib scores how much a training "
        "example raises the target, so its IF and TracIn carry a minus sign).",
        "",
    ]
    text = "\n".join(header) + table + "\n"
    print()
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "methods_quick" if args.quick else "methods"
    (args.out / f"{stem}.md").write_text(text)
    payload = {
        "command": cmdline, "environment": env_info, "quick": args.quick,
        "timeout_s": timeout, "total_s": total,
        "cases": {c: {k: v for k, v in i.items() if k not in ("data",)}
                  for c, i in case_info.items()},
        "methods": {c: {m: method_params(c, m, args.quick) for m in methods[c]}
                    for c in methods},
        "results": [{k: v for k, v in r.items() if k != "traceback"} for r in results.values()],
    }
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    print(f"\n[bench] wrote {args.out / (stem + '.md')} and {stem}.json "
          f"({total / 60:.1f} min)")
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
