"""What a benchmark run takes from pulled Hub repos instead of building it (``--from-hub``).

The Hub code fills a :class:`PulledBenchmark` from a dataset and a checkpoint repo
(:func:`hf_attrib.hub.benchmark.pull_benchmark`); ``run_benchmark(..., pulled=...)`` checks it
against the setting it runs and uses its data, models and ground truth. The benchmark layer
never reads the Hub itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hf_attrib.benchmark.data import BenchmarkData
from hf_attrib.benchmark.settings import BenchmarkSetting
from hf_attrib.benchmark.stacked import Stacked

__all__ = ["PulledBenchmark"]


@dataclass
class PulledBenchmark:
    """A setting's data, trained models and ground truth, as pulled.

    Attributes:
        data: the pulled parquet splits (``train``, ``test``, ``noisy_train``) and the
            flipped-label positions.
        full: the full-data model (a stack of one).
        lds_models: LDS subset models ``0..k-1`` for ensembling methods (empty if none).
        ground_truth: ``{"lds": (targets, masks)}`` and, with LOO, ``"loo": (targets,
            indices, full_targets)``: the arguments of ``lds`` / ``loo_corr``.
        noisy: the noisy-label model (a stack of one), or ``None`` if not pulled.
        loo_index: the left-out example of each LOO model.
        meta: the dataset repo's index (``setting``, ``n_train``, ``n_test``, ``lds_models``,
            ``smoke``, ...).
        source: where it came from (a folder or repo id), recorded in the results.
    """

    data: BenchmarkData
    full: Stacked
    lds_models: Stacked
    ground_truth: dict[str, Any]
    noisy: Stacked | None
    loo_index: list[int]
    meta: dict[str, Any]
    source: str

    def check(self, setting: BenchmarkSetting) -> None:
        """Refuse repos of another setting, or built at another size (smoke vs full).

        Args:
            setting: the setting of the run (after ``--smoke`` and data preparation).

        Raises:
            ValueError: naming the mismatch (and ``--smoke`` if that is the difference).
        """
        meta = self.meta
        if meta.get("setting") != setting.name:
            raise ValueError(f"{self.source} holds setting {meta.get('setting')!r}, not "
                             f"{setting.name!r}.")
        mine = {"n_train": setting.n_train, "n_test": setting.n_test,
                "lds_models": setting.lds_models}
        theirs = {k: meta.get(k) for k in mine}
        if mine != theirs:
            hint = (" (it is a smoke build: pass --smoke)" if meta.get("smoke")
                    else " (it is a full build: drop --smoke)")
            raise ValueError(f"{self.source} was exported for {theirs}, this run is "
                             f"{mine}{hint}.")
