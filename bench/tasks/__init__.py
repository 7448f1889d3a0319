"""Generated training tasks (no download): LRA's ListOps and multi-query associative recall (MQAR), and
the model trained on them (``model.py``) with its trainer (``trainer.py``).

Every generator is deterministic in its seed: ``make_splits(config, seed)`` returns the same
train/validation/test sets on every machine, each split drawn from its own generator.
"""

from .listops import ListOpsConfig, evaluate_listops, generate_listops, listops_splits
from .mqar import MQARConfig, generate_mqar, mqar_splits

__all__ = [
    "ListOpsConfig",
    "evaluate_listops",
    "generate_listops",
    "listops_splits",
    "MQARConfig",
    "generate_mqar",
    "mqar_splits",
]
