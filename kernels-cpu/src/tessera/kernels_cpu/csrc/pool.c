// Parallel parts for the C kernels on the process's OpenMP runtime. Built with -fopenmp, this
// library needs libgomp.so.1, which is the soname of the libgomp torch loads: the dynamic
// loader hands over that same copy, so the kernels run on torch's own worker threads instead
// of a second pool competing with torch's spinning workers for the cores.

#include <omp.h>

#include "pool.h"

void pool_run(part_fn fn, void *arg, int n_parts, int n_threads) {
    if (n_parts <= 0) return;
    if (n_threads <= 1 || n_parts == 1 || omp_in_parallel()) {
        for (int p = 0; p < n_parts; p++) fn(arg, p, n_parts);
        return;
    }
    if (n_threads > n_parts) n_threads = n_parts;
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, 1)
    for (int p = 0; p < n_parts; p++) fn(arg, p, n_parts);
}
