"""Speed benchmarks run alone (``python -m bench.perf.NAME``): ``gpu`` (the Triton kernels against their
peers; ``fla_interpret`` runs the fla peer in its dry run), ``cpu`` (the compiled CPU backend),
``distributed`` (context-parallel CPU ranks), and ``gpu_check.sh``, the one-shot check of a lent GPU.
"""
