"""Benchmarks of BlueEngine against raw pyzmq and multiprocessing queues (`make bench`).

`python -m bench.transport` moves items through a chain of forwarding steps in BlueEngine and in
two hand-written baselines; `python -m bench.memory` measures what an idle step replica costs
and how long an engine takes to start. README.md says what each figure means.
"""
