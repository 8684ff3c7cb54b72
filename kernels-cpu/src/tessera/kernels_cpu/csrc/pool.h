#pragma once
// Run fn(arg, part, n_parts) for every part in [0, n_parts) on up to n_threads threads (the
// caller's included) and return when all are done. Jobs from several callers run one at a time.
typedef void (*part_fn)(void *arg, int part, int n_parts);
void pool_run(part_fn fn, void *arg, int n_parts, int n_threads);
