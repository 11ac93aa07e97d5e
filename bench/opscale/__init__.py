"""The parts of ``bench/operator_scale.py`` (the operator at scale) that ``bench/apiserver_cost.py`` shares:
the API client (``api``), what the watches saw (``watches``), process and request accounting
(``accounting``), CPU profiles (``profiles``) and the BENCHMARKS.md section (``report``)."""
