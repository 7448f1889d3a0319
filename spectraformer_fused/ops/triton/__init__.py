"""The Triton backend: one kernel per stage (``stats``: the stabiliser pass; ``fwd``: the causal and
non-causal forward, walk or chunk mode by the RANGES flag; ``scan``: the range scan and its dstate; ``bwd``: dq
and dkv; ``steps``: tile-level helpers; ``common``: configurations), the hybrid window's parts (``window``,
``band``), hedgehog's log-sum-exp (``lse``) and the custom ops that users reach (``attention``)."""
