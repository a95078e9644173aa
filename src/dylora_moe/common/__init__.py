"""Helpers every feature shares, above the core and below the features (training, evaluation, continual,
the study) and the command line:

* :mod:`.configs` -- the config engine: YAML and ``KEY=VALUE`` overrides into typed config dataclasses;
* :mod:`.runs` -- run folders, checkpoint names, and finding the adapter of a run or checkpoint;
* :mod:`.devices` -- device and dtype selection;
* :mod:`.inference` -- loading a checkpoint (or a plain base model) with its tokenizer for inference.
"""
