"""normkit's benchmark suite: one runner (:mod:`benchmarks.runner`); the shapes it times (:mod:`benchmarks.cases`)
are of the operators of the package's one case registry (:mod:`normkit.check.cases`)."""
