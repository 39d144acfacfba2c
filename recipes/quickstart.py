"""Quick start: which training digits made a logistic regression predict what it predicts?

Runs offline on scikit-learn's 1,797 real handwritten digits (8x8), in under a minute on a
laptop CPU. It trains the model, runs the README's Usage snippet on it (IF with conjugate
gradient: scores and self-influence), then TRAK with the correct-class margin as the target,
and prints the training examples that helped the first test prediction most and the training
examples with the largest self-influence (unusual or mislabelled digits).

    python recipes/quickstart.py [--n-train 1000] [--n-test 20]
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
    """The first ``n_train`` digits for training and the next ``n_test`` for testing."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    if n_train < 1 or n_test < 1 or n_train + n_test > len(x):
        raise SystemExit(f"--n-train and --n-test must be positive and sum to at most {len(x)} "
                         f"(got {n_train} and {n_test}).")
    return (TensorDataset(x[:n_train], y[:n_train]),
            TensorDataset(x[n_train:n_train + n_test], y[n_train:n_train + n_test]))


def train(dataset: TensorDataset, seed: int = 0, epochs: int = 20) -> nn.Module:
    """A logistic regression (``nn.Linear(64, 10)``) trained with SGD."""
    torch.manual_seed(seed)
    model = nn.Linear(64, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(dataset, batch_size=64, shuffle=True)  # shuffling is fine for training
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=1000, help="training digits (default 1000)")
    parser.add_argument("--n-test", type=int, default=20, help="test digits (default 20)")
    args = parser.parse_args(argv)

    train_set, test_set = load(args.n_train, args.n_test)
    model = train(train_set)
    train_loader = DataLoader(train_set, batch_size=250)   # never shuffle attribution loaders
    test_loader = DataLoader(test_set, batch_size=20)
    labels = train_set.tensors[1]

    # The README's Usage snippet, as printed there. ---------------------------------------
    def f(params, data):                      # the training loss, on a batch
        x, y = data
        yhat = torch.func.functional_call(model, params, x)
        return nn.CrossEntropyLoss()(yhat, y)

    task = AttributionTask(loss_func=f, model=model, checkpoints=model.state_dict())
    attributor = IFAttributorCG(task=task, max_iter=10, regularization=1e-2)
    attributor.cache(train_loader)                       # Hessian data, cached features
    score = attributor.attribute(train_loader, test_loader)   # [n_train, n_test]
    self_influence = attributor.self_attribute(train_loader)  # [n_train]

    # The target is the loss, so helpful training examples score negative.
    first = int(test_set.tensors[1][0])
    helpful = (-score[:, 0]).topk(5).indices.tolist()
    print(f"IF (CG): test digit 0 (label {first}) is most helped by training examples "
          f"{helpful} with labels {[int(labels[i]) for i in helpful]}")
    unusual = self_influence.topk(5).indices.tolist()
    print(f"IF (CG): largest self-influence: training examples {unusual} with labels "
          f"{[int(labels[i]) for i in unusual]}")

    # TRAK with a "higher is better" target: helpful examples score positive. ---------------
    def margin(params, batch):  # log p/(1-p) of the true class
        x, y = batch
        logp = torch.log_softmax(torch.func.functional_call(model, params, x), -1)
        logp = logp.gather(1, y[:, None])[:, 0]
        return (logp - torch.log1p(-logp.exp())).mean()

    trak_task = AttributionTask(loss_func=f, model=model, checkpoints=model.state_dict(),
                                target_func=margin)
    trak = TRAKAttributor(task=trak_task, projector_kwargs={"proj_dim": 512})
    trak.cache(train_loader)
    helpful = trak.attribute(train_loader, test_loader)[:, 0].topk(5).indices.tolist()
    print(f"TRAK: test digit 0 (label {first}) is most helped by training examples "
          f"{helpful} with labels {[int(labels[i]) for i in helpful]}")


if __name__ == "__main__":
    main()
