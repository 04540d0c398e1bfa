"""Workload tooling over the real SGLang pool and radix caches: a scheduler-like replay driver, the soak
run and accounting checks. Used by tests, benchmarks and the serving check; the runtime cache never
imports it."""
