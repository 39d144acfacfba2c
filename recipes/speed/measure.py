"""One (library, case, row) measurement: the body of a method benchmark's child process.

Set-up is untimed: the prepared case is loaded, ``torch.func`` is warmed up, and the row runs
once on one training and one test batch with 2-3 solver iterations (the first execution of a
code path in a process is several times slower, for both libraries). Then, timed with
``time.perf_counter`` (and process CPU time):

* ``cache_attribute``: building the attributor, ``cache(train)``, ``attribute(train, test)``;
* ``self_attribute``: a fresh attributor's ``cache`` + ``self_attribute(train)``;

each the fastest of up to ``repeat`` runs while they stay within ``repeat_budget_s`` (other
load on the machine only slows a run down). Peak RSS is the child's ``VmHWM``. The result is
written as JSON after every phase, so a timed-out or failing phase leaves what finished.
"""

from __future__ import annotations

import gc
import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapters import make_adapter
from cases import load_case, resolve_layer
from method_table import checkpoints, method_params


def status_kb(field: str) -> float:
    """A ``/proc/self/status`` field in kB (``VmHWM``: peak RSS; ``VmRSS``: current)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return float("nan")


def warm_up_torch_func() -> None:
    """Pay torch.func's one-time lazy imports (~2 s: the first grad pulls in torch._dynamo)
    before the clock starts; library-independent, identical for both libraries."""
    import torch

    def f(w, x):
        return (torch.tanh(x @ w) ** 2).sum()

    w, x = torch.randn(4, 3), torch.randn(5, 2, 4)
    torch.func.vmap(torch.func.grad(f), in_dims=(None, 0))(w, x)
    _, vjp_fn = torch.func.vjp(torch.func.grad(f), w, x[0])
    vjp_fn(w)
    torch.func.jvp(lambda v: torch.func.grad(f)(v, x[0]), (w,), (w,))
    torch.func.hessian(f)(w, x[0])


def _best_of(phase: Callable[[], tuple[dict[str, float], Any]], key: str, repeat: int,
             budget_s: float) -> tuple[dict[str, float], Any]:
    """Min wall time over up to ``repeat`` runs; short runs only (noise of other load)."""
    best, out = phase()
    walls = [best[key]]
    while len(walls) < repeat and sum(walls) < budget_s:
        gc.collect()
        times, out2 = phase()
        walls.append(times[key])
        if times[key] < best[key]:
            best, out = times, out2
    best[key[:-2] + "_runs"] = walls
    return best, out


def run_method(lib: str, case_name: str, row: str, quick: bool, workdir: Path, threads: int,
               hf_proj_type: str, result_path: Path, repeat: int = 1,
               repeat_budget_s: float = 20.0, warmup: bool = True,
               mem_limit_gb: float = 12.0) -> None:
    """Set up (untimed), then time cache+attribute and self_attribute; write ``result_path``.

    Args:
        lib: ``"hf_attrib"`` or ``"dattri"``.
        case_name: a case of ``cases.CASES``, prepared in ``workdir``.
        row: a row of ``method_table.METHODS[case_name]``.
        quick: use the row's ``quick`` overrides.
        workdir: where ``prepare_case`` wrote the case.
        threads: torch intra-op threads.
        hf_proj_type: hf_attrib's projector kind (``auto``: its default).
        result_path: the JSON result (rewritten after each phase).
        repeat, repeat_budget_s: see the module docstring.
        warmup: run the untimed one-batch warm-up first.
        mem_limit_gb: address-space limit of this process (0: none).
    """
    result: dict[str, Any] = {"lib": lib, "case": case_name, "method": row, "status": "error"}
    if mem_limit_gb > 0:
        # A run that needs more fails with an allocation error (reported as n/a) instead of
        # waking the kernel's OOM killer on a machine other jobs share.
        import resource

        limit = int(mem_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        result["mem_limit_gb"] = mem_limit_gb

    def dump() -> None:
        result["peak_rss_mb"] = status_kb("VmHWM") / 1024
        result_path.write_text(json.dumps(result, indent=1))

    try:
        import torch
        from safetensors.torch import load_file
        from torch.utils.data import DataLoader, Subset

        torch.set_num_threads(threads)
        case = load_case(case_name, workdir)
        info = case.info
        mp = method_params(case_name, row, quick)
        if mp.get("layer"):
            mp["layer"] = resolve_layer(mp["layer"], info)
        result["params"] = mp
        ckpts = [load_file(p) for p in checkpoints(info, mp)]
        adapter = make_adapter(lib, hf_proj_type)
        result["version"] = adapter.version()
        warm_up_torch_func()
        result["setup_rss_mb"] = status_kb("VmRSS") / 1024

        def attribute_phase(params: dict[str, Any] = mp, train_loader: Any = case.train_loader,
                            test_loader: Any = case.test_loader
                            ) -> tuple[dict[str, float], Any]:
            c0, t0 = time.process_time(), time.perf_counter()
            attributor = adapter.build(params, case, ckpts)
            t1 = time.perf_counter()
            adapter.cache(attributor, params, train_loader)
            t2 = time.perf_counter()
            out = adapter.attribute(attributor, params, train_loader, test_loader)
            t3, c3 = time.perf_counter(), time.process_time()
            return {"init_s": t1 - t0, "cache_s": t2 - t1, "attribute_s": t3 - t2,
                    "cache_attribute_s": t3 - t0, "cache_attribute_cpu_s": c3 - c0}, out

        def self_phase() -> tuple[dict[str, float], Any]:
            c0, t0 = time.process_time(), time.perf_counter()
            out = adapter.self_influence(mp, case, ckpts)
            t1, c1 = time.perf_counter(), time.process_time()
            return {"self_attribute_s": t1 - t0, "self_attribute_cpu_s": c1 - c0}, out

        if warmup and mp["method"] != "rps":
            # Untimed warm-up on one train batch and one test batch (the shapes of the real
            # run) with 2-3 solver iterations. Skipped for RPS, whose dattri fine-tuning
            # cannot be shortened from outside.
            wmp = {k: v for k, v in mp.items() if k != "dattri"}  # warm-up caps hold for both
            for key, cap in (("recursion_depth", 2), ("max_iter", 3), ("proj_dim", 2)):
                if key in wmp:
                    wmp[key] = min(wmp[key], cap)
            w_train = DataLoader(Subset(case.train_set, range(info["train_batch"])),
                                 batch_size=info["train_batch"], shuffle=False)
            w_test = DataLoader(Subset(case.test_set, range(info["test_batch"])),
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
        times, scores = _best_of(attribute_phase, "cache_attribute_s", repeat, repeat_budget_s)
        result.update(times, status="ok", scores_shape=list(scores.shape),
                      scores_finite=bool(torch.isfinite(scores).all()))
        torch.save(scores.detach().float().cpu(), result_path.with_suffix(".scores.pt"))
        dump()  # an attribute result survives a failing or timed-out self_attribute
        del scores
        gc.collect()
        missing = adapter.missing_self_attribute(mp)
        if missing:
            result["self_status"] = f"n/a ({missing})"
        else:
            result["self_started_at"] = time.time()
            dump()
            times, values = _best_of(self_phase, "self_attribute_s", repeat, repeat_budget_s)
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
