"""plait.bench: microbenchmarks.

Each benchmark is a module here with ``main(argv=None)``. From a checkout run it as
``python bench/NAME.py [ARGS]``; from an installed package as ``plait bench NAME [ARGS]``
(``plait bench`` lists them). Results go through ``common.write_result`` to
``bench/results/*.json`` (``./plait-bench-results/`` outside a checkout), and
``python bench/report.py`` turns them into the README's tables.
"""
