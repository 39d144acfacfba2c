"""Benchmark settings: models, data, ground truth and the runner.

``import hf_attrib.benchmark.models`` registers the benchmark model families (``model_type``
``"hf_attrib_*"``) with ``transformers``' ``Auto`` classes, so that a saved or exported
benchmark checkpoint loads with ``AutoModel.from_pretrained`` (no ``trust_remote_code``: the
code is hf_attrib's, never the repository's). This package itself does not import them:
``hf_attrib.algorithm`` imports ``hf_attrib.benchmark.utils``, and the core library must not
load ``transformers``.
"""
