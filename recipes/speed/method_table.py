"""The rows of the method benchmark: which registered method, with which options, per case.

A row is a method of ``hf_attrib.algorithm.registry`` (``"method"``, by its registry name)
with one set of hyperparameters used by both libraries. Its keys:

* ``method``: the registry name (``if-cg``, ``trak``, ...);
* ``layer``: the attributed module (``{last}``: the case's last block); RPS's final layer;
* ``projection``: the dimension gradients are projected to (TracIn, Grad-*, TRAK);
* ``ckpts`` / ``models``: TracInCP's last checkpoints of one run / TRAK's independently
  trained models;
* ``dattri``: options that differ on the dattri side (it has no block CG);
* anything else: the attributor's constructor options, passed as they are
  (``regularization``, ``max_iter``, ``block``, ``recursion_depth``, ...).

``quick`` overrides apply with ``--quick``. The hf_attrib side is built by
``make_attributor(row["method"], task, **options)``; ``adapters.py`` holds the dattri side.
"""

from __future__ import annotations

from typing import Any

from cases import LAST_BLOCK

# Keys of a row that are not constructor options (see the module docstring).
BENCH_KEYS = frozenset({"method", "layer", "projection", "ckpts", "models", "dattri"})

# case -> row name -> {"full": row, "quick": overrides}
METHODS: dict[str, dict[str, dict[str, dict[str, Any]]]] = {
    "mlp-digits": {
        # The full MLP has 17,226 parameters: an explicit Hessian of all of them is ~1.2 GB and
        # dattri rebuilds (and re-solves) it for every (train batch, test batch, Hessian batch)
        # triple, so both libraries run Explicit on the last Linear layer (650 parameters).
        "if-explicit": {"full": {"method": "if-explicit", "layer": "fc3",
                                 "regularization": 1e-2}},
        "if-cg": {"full": {"method": "if-cg", "max_iter": 10, "regularization": 1e-2},
                  "quick": {"max_iter": 5}},
        # The Hessian's most negative eigenvalue is -0.23: with regularization 1e-2 CG runs on
        # an indefinite system (a heuristic, as in the paper's set-up); 0.3 makes it positive
        # definite, where CG converges to the inverse-HVP and block CG applies.
        "if-cg-pd": {"full": {"method": "if-cg", "max_iter": 10, "regularization": 0.3},
                     "quick": {"max_iter": 5}},
        # Accuracy, not iterations, matched (bench_cg_accuracy.py): 2 block-CG iterations reach
        # the self-influence error of 10 plain ones; 1 reaches 0.06, against 0.68 for dattri's
        # CG with 10 (its per-Hessian-batch solves, summed, are another estimator). dattri has
        # no block solver and runs its plain CG with 10 in both rows.
        "if-cg-block2": {"full": {"method": "if-cg", "max_iter": 2, "regularization": 0.3,
                                  "block": True, "dattri": {"max_iter": 10}},
                         "quick": {"max_iter": 1, "dattri": {"max_iter": 5}}},
        "if-cg-block1": {"full": {"method": "if-cg", "max_iter": 1, "regularization": 0.3,
                                  "block": True, "dattri": {"max_iter": 10}},
                         "quick": {"max_iter": 1, "dattri": {"max_iter": 5}}},
        "if-lissa": {"full": {"method": "if-lissa", "recursion_depth": 100, "batch_size": 50,
                              "scaling": 50.0, "damping": 1e-3},
                     "quick": {"recursion_depth": 10, "batch_size": 25}},
        "if-arnoldi": {"full": {"method": "if-arnoldi", "proj_dim": 50, "max_iter": 100,
                                "regularization": 1e-2},
                       "quick": {"proj_dim": 10, "max_iter": 20}},
        "tracin": {"full": {"method": "tracin", "ckpts": 3, "projection": 512}},
        "grad-dot": {"full": {"method": "grad-dot", "projection": 512}},
        "grad-cos": {"full": {"method": "grad-cos", "projection": 512}},
        "rps-l2": {"full": {"method": "rps", "layer": "fc3", "l2_strength": 0.003}},
        # n_train > proj_dim: the kernel is invertible without regularization in both.
        "trak-1": {"full": {"method": "trak", "models": 1, "projection": 512,
                            "regularization": 0.0},
                   "quick": {"projection": 64}},
        "trak-5": {"full": {"method": "trak", "models": 5, "projection": 512,
                            "regularization": 0.0},
                   "quick": {"projection": 64}},
    },
    "gpt2-10m": {
        "trak": {"full": {"method": "trak", "models": 1, "projection": 512,
                          "regularization": 1e-3, "layer": LAST_BLOCK}},
        "grad-dot": {"full": {"method": "grad-dot", "projection": 512, "layer": LAST_BLOCK}},
        "grad-cos": {"full": {"method": "grad-cos", "projection": 512, "layer": LAST_BLOCK}},
        "tracin": {"full": {"method": "tracin", "ckpts": 2, "projection": 512,
                            "layer": LAST_BLOCK}},
        "if-cg": {"full": {"method": "if-cg", "max_iter": 3, "regularization": 1e-2,
                           "layer": LAST_BLOCK}},
        "if-arnoldi": {"full": {"method": "if-arnoldi", "proj_dim": 10, "max_iter": 20,
                                "regularization": 1e-2, "layer": LAST_BLOCK},
                       "quick": {"proj_dim": 5, "max_iter": 10}},
        "if-lissa": {"full": {"method": "if-lissa", "recursion_depth": 10, "batch_size": 8,
                              "scaling": 50.0, "damping": 1e-3, "layer": LAST_BLOCK},
                     "quick": {"recursion_depth": 5, "batch_size": 4}},
    },
}


def method_params(case: str, row: str, quick: bool) -> dict[str, Any]:
    """The options of ``row`` in ``case`` (its ``quick`` overrides applied with ``quick``)."""
    spec = METHODS[case][row]
    params = dict(spec["full"])
    if quick:
        params.update(spec.get("quick", {}))
    return params


def constructor_options(params: dict[str, Any]) -> dict[str, Any]:
    """The row's options that go to the attributor's constructor as they are."""
    return {k: v for k, v in params.items() if k not in BENCH_KEYS}


def checkpoints(info: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """The checkpoint files a row attributes with: TracInCP's last ``ckpts`` of one run,
    TRAK's first ``models`` models, otherwise the first model."""
    if params["method"] == "tracin":
        return info["tracin_ckpts"][-params["ckpts"]:]
    if params["method"] == "trak":
        return info["models"][:params["models"]]
    return info["models"][:1]


def tracin_weights(info: dict[str, Any], params: dict[str, Any]) -> list[float]:
    """TracInCP's checkpoint weights (the learning rate at each of its checkpoints)."""
    return info["tracin_weights"][-params["ckpts"]:]


def hf_attrib_kwargs(params: dict[str, Any], fns: dict[str, Any], info: dict[str, Any],
                     proj_type: str) -> dict[str, Any]:
    """``make_attributor`` keyword arguments of a row for hf_attrib (device: the CPU).

    ``proj_type`` ``"auto"`` leaves hf_attrib's own default projector (sparse JL on CPU).
    """
    kwargs = {**constructor_options(params), "device": "cpu"}
    method, layer = params["method"], params.get("layer")
    if method == "rps":
        kwargs.update(final_linear_layer_name=layer, normalize_preactivate=False)
    elif layer:
        kwargs["layer_name"] = [layer]
    if "projection" in params:
        projector = {"proj_dim": params["projection"], "proj_seed": 0}
        if proj_type != "auto":
            projector["proj_type"] = proj_type
        kwargs["projector_kwargs"] = projector
    if method == "trak":
        kwargs["correct_probability_func"] = fns["prob"]
    if method == "tracin":
        kwargs.update(weight_list=tracin_weights(info, params), normalized_grad=False)
    return kwargs
