#!/usr/bin/env python
"""Runtime and peak memory of every attribution method, in the shape of the dattri paper's
Table 4: time of ``cache`` + ``attribute``, time of ``self_attribute``, peak memory.

It runs hf_attrib and, when ``dattri`` is importable in the same environment, the same cases
with dattri (written the way dattri's own API expects them: same data, same loaders, same
checkpoints, same hyperparameters, same thread count), and reports dattri time / hf_attrib
time for both columns.

Every (library, case, row) runs in a fresh Python process so that its peak memory (``VmHWM``
of the child, i.e. peak resident set size) and its runtime are its own; models are trained
once per case by another child and saved as safetensors that the method children load
(training time is never counted). This module is the orchestration: ``cases.py`` holds the
problems, ``method_table.py`` the rows (registry methods and their options), ``adapters.py``
the two libraries, ``measure.py`` a child's timing, ``tables.py`` the tables. It writes one
``results/methods-<case>[-quick][-<label>]-<date>.md`` (+ ``.json``) per case. See
``recipes/speed/README.md``.

    python recipes/speed/run.py methods --quick                  # ~1-2 min, hf_attrib only
    /work/venv-dattri/bin/python recipes/speed/run.py methods     # both libraries, full sizes
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from adapters import dattri_available
from cases import CASES, prepare_case
from method_table import METHODS, method_params
from report import Result
from tables import LIBS, fmt_s, render_table

DESCRIPTION = ("per attribution method: runtime of cache + attribute and of self_attribute, "
               "peak memory (Table 4 of the dattri paper), hf_attrib and, where importable, "
               "dattri 0.3.0")
ME = Path(__file__).resolve()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``run.py methods``."""
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--methods", nargs="+", default=None,
                        help="subset of row names (any case); default: all")
    parser.add_argument("--libs", nargs="+", default=None, choices=LIBS,
                        help="default: hf_attrib, plus dattri when it is importable")
    parser.add_argument("--quick", action="store_true", help="small sizes: ~1-2 minutes")
    parser.add_argument("--label", default=None,
                        help="appended to the results' case name, for a partial run "
                             "(e.g. --methods if-cg if-lissa --label cg-lissa)")
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


def _finish(res: dict[str, Any], outcome: str, wall: float, maxrss: float, log: Path) -> None:
    """Complete a child's result with what the parent saw (timeout, exit status, RSS)."""
    res["wall_s"] = wall
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
            res["timeout_lower_s"] = killed_at - res.get("attribute_started_at",
                                                         killed_at - wall)
        res["peak_rss_mb"] = res.get("peak_rss_mb") or maxrss
    elif outcome != "ok" and res.get("status") != "ok":
        tail = log.read_text()[-300:].strip().splitlines()
        res["reason"] = res.get("reason") or f"{outcome}: {tail[-1] if tail else ''}"[:200]
    res["finished"] = True


def _summary(res: dict[str, Any]) -> str:
    """One progress line's worth of a finished run."""
    if res.get("status") != "ok":
        return f"{res['status']}: {res.get('reason', '')}"
    msg = (f"cache+attribute {fmt_s(res.get('cache_attribute_s'))}s, "
           f"self_attribute {fmt_s(res.get('self_attribute_s'))}s, "
           f"peak {res.get('peak_rss_mb') or 0:.0f} MB")
    if res.get("self_status", "ok") != "ok":
        msg += f" [self_attribute {res['self_status']}]"
    return msg


def _case_body(case: str, info: dict[str, Any], quick: bool, libs: list[str], timeout: float,
               minutes: float, table: str) -> str:
    """What a results file says below the standard header: sizes, how to read, the table."""
    sizes = (f"{case}: n_train={info['n_train']}, n_test={info['n_test']}, train batch "
             f"{info['train_batch']}, test batch {info['test_batch']}, {info['n_params']} params"
             + (f" ({info['n_params_layer']} in {info['last_block']}, the attributed layer)"
                if "n_params_layer" in info else ""))
    return "\n".join([
        f"Libraries: {', '.join(libs)}; {'quick' if quick else 'full'} sizes; total wall time "
        f"{minutes:.1f} min; per-run timeout {timeout:.0f} s",
        "",
        f"Sizes: {sizes}",
        "",
        "Times in seconds (time.perf_counter, checkpoint loading and model training excluded; "
        "cache+attribute includes building the attributor). self_attribute: a fresh "
        "attributor's cache + self_attribute. Peak RSS = VmHWM of the child process that "
        "ran the method (includes the Python/torch baseline). ratio = dattri time / hf_attrib "
        "time. r(scores) = Pearson correlation of the two libraries' attribute() scores "
        "(negative where the sign conventions differ: hf_attrib scores how much a training "
        "example raises the target, so its IF and TracIn carry a minus sign).",
        "",
        table,
    ])


def run(args: argparse.Namespace) -> list[Result]:
    """Run the selected (library, case, row) children; one ``Result`` per case."""
    sizes = {"n_train": args.n_train, "n_test": args.n_test, "train_batch": args.batch,
             "test_batch": args.test_batch}
    if args._prepare:  # child: train a case's checkpoints
        info = prepare_case(args._prepare, args.quick, args.workdir, args.threads, args.seed,
                            sizes)
        print(json.dumps({k: v for k, v in info.items() if k not in ("models", "tracin_ckpts")}))
        return []
    if args._run:  # child: one (library, case, row)
        from measure import run_method

        lib, case, row = args._run
        run_method(lib, case, row, args.quick, args.workdir, args.threads, args.hf_proj_type,
                   args._result, args.repeat, args.repeat_budget, not args.no_warmup,
                   args.mem_limit_gb)
        return []

    timeout = args.timeout or (60.0 if args.quick else 120.0)
    have_dattri, why = dattri_available()
    libs = args.libs or (["hf_attrib", "dattri"] if have_dattri else ["hf_attrib"])
    if "dattri" in libs and not have_dattri:
        raise SystemExit(f"[bench] --libs dattri: {why}")
    if not have_dattri:
        print(f"[bench] {why}: running hf_attrib only")
    if args.methods:
        unknown = set(args.methods) - {m for c in CASES for m in METHODS[c]}
        if unknown:
            raise SystemExit(f"[bench] unknown methods {sorted(unknown)}")
    methods = {c: [m for m in METHODS[c] if args.methods is None or m in args.methods]
               for c in args.cases}
    if args.render_only:
        args.resume = True
        if args.workdir is None:
            raise SystemExit("[bench] --render-only needs --workdir")
    tmp = None
    if args.workdir is None:
        tmp = tempfile.mkdtemp(prefix="hf_attrib_bench_")
        workdir = Path(tmp)
    else:
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "runs").mkdir(exist_ok=True)
    me = [sys.executable, str(ME)]
    common = ["--workdir", str(workdir), "--threads", str(args.threads), "--seed",
              str(args.seed), "--hf-proj-type", args.hf_proj_type, "--repeat", str(args.repeat),
              "--repeat-budget", str(args.repeat_budget),
              "--mem-limit-gb", str(args.mem_limit_gb)] + (
                  ["--no-warmup"] if args.no_warmup else []) + (
                  ["--quick"] if args.quick else [])
    size_args = [a for k, v in sizes.items() if v is not None
                 for a in (f"--{k.replace('_', '-').replace('train-batch', 'batch')}", str(v))]
    print(f"[bench] libs={libs} cases={args.cases} quick={args.quick} threads={args.threads} "
          f"timeout={timeout:.0f}s workdir={workdir}")
    out: list[Result] = []
    try:
        for case in args.cases:
            if not methods[case]:
                continue
            started, t_case = dt.datetime.now(), time.perf_counter()
            log = workdir / f"prepare-{case}.log"
            if args.resume and (workdir / f"{case}-info.json").exists():
                outcome, wall = "ok", 0.0  # reuse the checkpoints already there
            else:
                outcome, wall, _ = _spawn(me + common + size_args + ["--_prepare", case], log,
                                          1800, args.threads)
            if outcome != "ok":
                print(log.read_text()[-3000:])
                raise SystemExit(f"[bench] preparing {case} failed ({outcome}); log: {log}")
            info = json.loads((workdir / f"{case}-info.json").read_text())
            acc = info.get("test_accuracy")
            print(f"[bench] prepared {case} in {wall:.1f}s (untimed): {info['n_params']} params"
                  + (f", test accuracy {[round(a, 3) for a in acc]}" if acc else ""))
            results: dict[tuple[str, str, str], dict] = {}
            for row in methods[case]:
                for lib in libs:
                    res_path = workdir / "runs" / f"{lib}-{case}-{row}.json"
                    if args.resume and res_path.exists():
                        done = json.loads(res_path.read_text())
                        if done.get("finished"):
                            results[(lib, case, row)] = done
                            print(f"[bench] {lib:9s} {case:10s} {row:10s} (from {res_path})")
                            continue
                    if args.render_only:
                        continue  # shown as "-": not run
                    log = res_path.with_suffix(".log")
                    cmd = me + common + ["--_run", lib, case, row, "--_result", str(res_path)]
                    load = os.getloadavg()[0]
                    outcome, wall, maxrss = _spawn(cmd, log, timeout, args.threads)
                    res = json.loads(res_path.read_text()) if res_path.exists() else {
                        "lib": lib, "case": case, "method": row, "status": "error"}
                    res["loadavg_1min_before"] = load
                    res["timeout_s"] = timeout
                    _finish(res, outcome, wall, maxrss, log)
                    res_path.write_text(json.dumps(res, indent=1))
                    results[(lib, case, row)] = res
                    print(f"[bench] {lib:9s} {case:10s} {row:10s} {_summary(res)}", flush=True)
            table = render_table(results, [case], methods, libs, workdir)
            minutes = (time.perf_counter() - t_case) / 60
            print()
            print(table)
            name = f"methods-{case}" + ("-quick" if args.quick else "") + (
                f"-{args.label}" if args.label else "")
            title = (f"hf_attrib{' vs dattri' if 'dattri' in libs else ''}: method runtimes, "
                     f"{case} ({'quick' if args.quick else 'full'} sizes)")
            payload = {
                "libs": libs, "threads": args.threads, "quick": args.quick,
                "timeout_s": timeout, "total_s": minutes * 60,
                "case_info": {k: v for k, v in info.items() if k != "data"},
                "methods": {m: method_params(case, m, args.quick) for m in methods[case]},
                "results": [{k: v for k, v in r.items() if k != "traceback"}
                            for r in results.values()],
            }
            out.append(Result(name, title, _case_body(case, info, args.quick, libs, timeout,
                                                      minutes, table), payload, started))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    from run import run_as_script

    sys.exit(run_as_script("methods"))
