"""The problems the method benchmarks time: data, model, user functions and checkpoints.

Two cases, each with ``full`` sizes and ``quick`` (smoke) overrides:

* ``mlp-digits``: scikit-learn's digits, an MLP 64-128-64-10 with dropout 0.1, trained with
  SGD from 5 seeds (TRAK-5's ensemble), plus TracInCP checkpoints along seed 0's run;
* ``gpt2-10m``: a 6-block GPT-2 (10.8M parameters, random init) on random tokens, the
  initialisation and the model after 3 AdamW steps.

``prepare_case`` trains the checkpoints once (untimed) and writes them, the data and an
``<case>-info.json`` to a work folder; ``load_case`` reads them back in a method's process.
The user functions are written once, as a user of either library would write them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

GPT2_CONFIG = {"vocab_size": 65, "n_positions": 256, "n_embd": 384, "n_layer": 6, "n_head": 6,
               "bos_token_id": 0, "eos_token_id": 0}
LAST_BLOCK = "transformer.h.{last}"  # the last transformer block (transformer.h.5 in full)


def case_params(case: str, quick: bool, overrides: dict[str, int | None] | None = None
                ) -> dict[str, Any]:
    """The sizes and training recipe of ``case`` (``quick`` ones), ``overrides`` applied."""
    params = dict(CASES[case]["quick" if quick else "full"])
    params.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return params


def gpt2_config(info: dict[str, Any]) -> dict[str, Any]:
    """The ``GPT2Config`` arguments of a prepared gpt2 case."""
    return {**GPT2_CONFIG, **info.get("gpt2", {})}


def resolve_layer(layer: str | None, info: dict[str, Any]) -> str | None:
    """``layer`` with ``{last}`` replaced by the index of the case's last block."""
    if layer is None or "{last}" not in layer:
        return layer
    return layer.format(last=gpt2_config(info)["n_layer"] - 1)


def build_model(case: str, info: dict[str, Any]) -> Any:
    """A fresh (untrained) model of ``case``."""
    import torch
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
    model = GPT2LMHeadModel(GPT2Config(**gpt2_config(info)))
    model.set_attn_implementation("eager")
    return model


def user_functions(case: str, model: Any) -> dict[str, Any]:
    """``loss``, ``margin`` (TRAK's target) and ``prob`` (TRAK's correct probability).

    Written once, as a user of either library would: ``f(params, batch)``. The reshapes make
    them accept what each library passes: hf_attrib always passes a batch (of one for
    per-example gradients); dattri passes an unbatched example (TracIn, TRAK), a batch of one
    (IF gradients), a whole batch (Hessians), and float-cast labels/tokens (LiSSA).
    """
    import torch
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
                 overrides: dict[str, int | None] | None = None) -> dict[str, Any]:
    """Train the checkpoints of a case (not timed) and save data + checkpoints to workdir.

    Returns:
        The case's info (sizes, checkpoint paths, parameter counts), also written to
        ``workdir/<case>-info.json``.
    """
    import torch
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
        last = resolve_layer(LAST_BLOCK, info)
        info["last_block"] = last
        info["n_params_layer"] = sum(p.numel() for n, p in model.named_parameters()
                                     if n.startswith(last + "."))
    save_file({k: v.contiguous() for k, v in data.items()}, str(workdir / f"{case}-data.safetensors"))
    info["data"] = str(workdir / f"{case}-data.safetensors")
    (workdir / f"{case}-info.json").write_text(json.dumps(info, indent=1))
    return info


@dataclass
class LoadedCase:
    """A prepared case in a method's process: data sets, loaders, model, user functions."""

    info: dict[str, Any]
    train_set: Any
    test_set: Any
    train_loader: Any
    test_loader: Any
    model: Any
    fns: dict[str, Any]


def load_case(case: str, workdir: Path) -> LoadedCase:
    """Read a prepared case back: unshuffled loaders of its batch sizes, the model in eval
    mode (attribution runs without dropout) and its user functions."""
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader, TensorDataset

    info = json.loads((workdir / f"{case}-info.json").read_text())
    data = load_file(info["data"])
    if case == "mlp-digits":
        train_set = TensorDataset(data["x_train"], data["y_train"])
        test_set = TensorDataset(data["x_test"], data["y_test"])
    else:
        train_set = TensorDataset(data["x_train"])
        test_set = TensorDataset(data["x_test"])
    model = build_model(case, info)
    model.eval()
    return LoadedCase(info, train_set, test_set,
                      DataLoader(train_set, batch_size=info["train_batch"], shuffle=False),
                      DataLoader(test_set, batch_size=info["test_batch"], shuffle=False),
                      model, user_functions(case, model))
