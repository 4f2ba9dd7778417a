"""``make bench``: every precision and every serving path measured side by side on this host.

``python -m bench.run`` (see docs/benchmarks/README.md) builds the demo models into a repository
(existing variants are kept), then measures, interleaving the contenders in one run:

- :mod:`bench.engine_level`: every variant in-process on every engine that can run it;
- :mod:`bench.serving`: in-process vs gateway (embedded) vs Triton vs gateway -> Triton, and the
  gateway's ceiling;
- :mod:`bench.profiling`: what bounds a figure that misses its target;

and writes the raw JSON and the report for this host's CPU class,
``docs/benchmarks/<class>.json`` + ``.md`` (:mod:`bench.results`, :mod:`bench.report`).
"""
