"""The report: ``python -m bench.report`` (``__main__.py``) runs one module per section (``accuracy``,
``kernel_estimation``, ``speed``, ``weight_cost``, ``train``, ``fitting``, ``guide``, ``varlen``, ``window``;
their sizes in ``settings``). ``fitting``, ``varlen``, ``window`` and ``train`` also run alone
(``python -m bench.report.NAME``), as does ``linearize`` (whole models linearized); ``current`` assembles
the newest result of every section in bench/results/ into ``bench/results/REPORT.md``.
"""
