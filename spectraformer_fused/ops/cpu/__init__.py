"""The compiled CPU backend: ``extension`` (how ``csrc/`` is built, cached by ``build_cache`` and loaded),
``attention`` (plain random-feature attention and its autograd) and ``window`` (the hybrid window, sinks and
factor). The public names of ``attention`` and ``extension`` are handed on here."""

from .attention import (  # noqa: F401
    EXTENSION_NAME,
    FUSED_BACKWARD_KINDS,
    SKIP_ENV,
    cpu_attention,
    extension_available,
    extension_built,
    extension_error,
    extension_spec,
    extension_status,
    reference_grads,
)
