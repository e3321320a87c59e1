"""spice_fast as a backend of other trainers, one module per trainer library.

- ``spice_fast.integrations.trl``: ``answer_reward`` (the C++ answer matcher as a TRL reward function)
  and ``SpiceGRPOTrainer`` (``trl.GRPOTrainer`` computing its per-token log-probabilities with
  ``spice_fast.kernels.fused_linear_logprob``). Needs ``pip install trl``.

Importing this package imports none of those libraries; each submodule imports its own on first use
and says which package to install when it is missing. Tests: ``pytest tests/test_integrations.py``.
"""
