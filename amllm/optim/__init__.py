"""Adaptive Memory optimizers: AM-AdamW and AM-SGD (arXiv 2510.04988).

``AMAdamW`` / ``AMSGD`` are thin ``torch.optim.Optimizer`` classes over the pure
functions in ``functional`` (``am_adamw``, ``am_sgd``); ``beta`` holds the shared
β-from-sums and policy code, ``reduce`` the resolution of the ``reducer`` argument.
"""

from .am_adamw import AMAdamW
from .am_sgd import AMSGD
from .beta import POLICIES, BetaConfig, BetaState, apply_policy, beta_from_sums
from .functional import AdamWGroup, SGDGroup, am_adamw, am_sgd, lr_ratio
from .reduce import process_group_reducer, resolve_reducer

__all__ = [
    "AMAdamW", "AMSGD", "am_adamw", "am_sgd", "AdamWGroup", "SGDGroup", "BetaConfig", "BetaState",
    "beta_from_sums", "apply_policy", "lr_ratio", "POLICIES", "process_group_reducer", "resolve_reducer",
]
