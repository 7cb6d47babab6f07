"""Evaluation: fact recall on held-out probes, validation loss, and the memory's routing of probes.

- :mod:`~moc_megatron.eval.probes`: probes files and multiple-choice candidate sets;
- :mod:`~moc_megatron.eval.scoring`: greedy exact match, log-likelihood ranking, validation loss, against
  any ``tokens [b, s] -> logits [b, s, V]`` callable;
- :mod:`~moc_megatron.eval.models`: a Megatron checkpoint or a Hugging Face folder as such a callable;
- :mod:`~moc_megatron.eval.routing`: the chapters the router picks for probe prompts;
- :mod:`~moc_megatron.eval.evaluate`: one evaluation run (what ``tools/evaluate_probes.py`` calls).
"""
