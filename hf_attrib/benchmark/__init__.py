"""Benchmark settings: models, data, ground truth and the runner.

Modules, lowest first:

* ``settings``: the settings registry (``get_setting``, ``smoke_setting``);
* ``models``: the benchmark model families as ``transformers`` models;
* ``data`` (image/digits samples), ``text`` (Tiny Shakespeare), ``midi`` (the 388-event MIDI
  encoding), ``music`` (MAESTRO windows), ``sampling`` (generated test sets);
* ``builders`` (a setting's model, loss and target functions), ``stacked`` (trained models as
  stacked tensors), ``pulled`` (what a ``--from-hub`` run takes from pulled repos);
* ``runner`` (``hf-attrib bench run`` / ``ground-truth``) and ``report`` (its tables).
* ``utils``: ``SubsetSampler``, re-exported from ``hf_attrib.loaders``, its home.

The benchmark never talks to the Hub: ``hf_attrib.hub`` reads pulled repos into a
``PulledBenchmark`` and the CLI hands it to ``run_benchmark``.

``import hf_attrib.benchmark.models`` registers the benchmark model families (``model_type``
``"hf_attrib_*"``) with ``transformers``' ``Auto`` classes, so that a saved or exported
benchmark checkpoint loads with ``AutoModel.from_pretrained`` (no ``trust_remote_code``: the
code is hf_attrib's, never the repository's). This package itself imports none of its
modules, so that importing one of them stays light.
"""
