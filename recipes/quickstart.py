"""Quick start: which training digits made a logistic regression predict what it predicts?

Runs offline on scikit-learn's 1,797 real handwritten digits (8x8). It trains the model,
attributes 20 test predictions to 1,000 training examples with IF (CG) and TRAK, and prints
the most helpful training examples (and their labels) for the first test digit.

    python recipes/quickstart.py
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hf_attrib.algorithm import IFAttributorCG, TRAKAttributor
from hf_attrib.task import AttributionTask


def load(n_train: int, n_test: int) -> tuple[TensorDataset, TensorDataset]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    return (TensorDataset(x[:n_train], y[:n_train]),
            TensorDataset(x[n_train:n_train + n_test], y[n_train:n_train + n_test]))


def train(dataset: TensorDataset, seed: int = 0, epochs: int = 20) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Linear(64, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(dataset, batch_size=64, shuffle=True)
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=20)
    args = parser.parse_args()

    train_set, test_set = load(args.n_train, args.n_test)
    model = train(train_set)

    def loss(params, batch):
        x, y = batch
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, x), y)

    def margin(params, batch):  # log p/(1-p) of the true class: "higher is better"
        x, y = batch
        logp = torch.log_softmax(torch.func.functional_call(model, params, x), -1)
        logp = logp.gather(1, y[:, None])[:, 0]
        return (logp - torch.log1p(-logp.exp())).mean()

    train_loader = DataLoader(train_set, batch_size=250)   # never shuffle attribution loaders
    test_loader = DataLoader(test_set, batch_size=20)
    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict(),
                           target_func=margin)

    for name, attributor in [
        ("IF (CG)", IFAttributorCG(task=task, max_iter=20, regularization=1e-2)),
        ("TRAK", TRAKAttributor(task=task, projector_kwargs={"proj_dim": 512})),
    ]:
        attributor.cache(train_loader)
        scores = attributor.attribute(train_loader, test_loader)  # [n_train, n_test]
        top = scores[:, 0].topk(5).indices.tolist()
        labels = [int(train_set.tensors[1][i]) for i in top]
        print(f"{name}: test digit 0 (label {int(test_set.tensors[1][0])}) is most helped by "
              f"training examples {top} with labels {labels}")


if __name__ == "__main__":
    main()
