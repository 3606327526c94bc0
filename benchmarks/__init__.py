"""normkit's benchmark suite: one runner (:mod:`benchmarks.runner`), one registry of cases (:mod:`benchmarks.cases`)."""
