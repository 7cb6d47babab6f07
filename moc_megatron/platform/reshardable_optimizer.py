"""megatron-core 0.16.1's layout-free distributed-optimizer checkpoint (``fully_reshardable``) on this platform.

Two adaptations, both applied by the checkpoint code just before it asks the optimizer for its
``sharded_state_dict``:

- ``sharded_state_dict_metadata``: on a CPU the ``fully_reshardable`` save must take megatron's
  memory-efficient variant, which gathers the optimizer state over the gloo data-parallel group onto DP
  rank 0; the default variant all-gathers over NCCL (``Tensor.cuda()``, distrib_optimizer.py:1089). Both
  variants write state that loads interchangeably (megatron's docstring, distrib_optimizer.py:1425).
- ``allow_model_space_load``: without TE/Apex the inner optimizer is torch's Adam, which keeps a ``step``
  tensor in every parameter's state. The model-space loaders (``fully_reshardable``,
  ``fully_sharded_model_space``) pass no per-parameter ``step`` (it travels in the param groups), and
  ``_set_main_param_and_optimizer_states`` (distrib_optimizer.py:937-940) copies every key of the
  parameter's state from them: ``KeyError: 'step'``. The patched method copies the keys it is given and
  leaves ``step`` to the param groups.
"""

from __future__ import annotations

import types

from megatron.core.optimizer import MegatronOptimizer

from moc_megatron.platform.device import using_gpu


def sharded_state_dict_metadata(metadata: dict) -> dict:
    """``metadata`` for ``optimizer.sharded_state_dict`` with what this platform needs added (CPU: gloo gather)."""
    if using_gpu() or metadata.get("distrib_optim_sharding_type") != "fully_reshardable":
        return dict(metadata)
    return {**metadata, "distrib_optim_fully_reshardable_mem_efficient": True}


def _set_given_main_param_and_optimizer_states(self, model_param, tensors: dict) -> None:
    group_index, group_order = self.model_param_group_index_map[model_param]
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    state = self.optimizer.state[main_param]
    kept = {key: state.pop(key) for key in list(state) if key not in tensors}  # torch Adam's "step"
    try:
        type(self)._set_main_param_and_optimizer_states(self, model_param, tensors)
    finally:
        state.update(kept)


def allow_model_space_load(optimizer: MegatronOptimizer) -> None:
    """Let every distributed optimizer in ``optimizer`` load model-space state into torch Adam (see above)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(sub, DistributedOptimizer) and not sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            sub._set_main_param_and_optimizer_states = types.MethodType(
                _set_given_main_param_and_optimizer_states, sub)
