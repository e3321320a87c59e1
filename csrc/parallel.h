// Splitting work over threads: torch's own OpenMP pool when the extension is built with -fopenmp.
//
// The extensions link libgomp.so.1 (setup.py adds -fopenmp). torch's wheels ship libgomp.so.1 with
// the same soname and load it first, so the dynamic loader binds our OpenMP calls to torch's runtime:
// a parallel region here runs on the very worker threads torch's GEMMs just used, which are still
// spinning after them, at a cost of a few microseconds. (A std::thread started per call instead
// waited for a core those spinning workers held: a 2-thread SwiGLU backward took 30 ms for 3 ms of
// work inside a training step.) Built without OpenMP, everything runs on the calling thread.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace spice_parallel {

// fn(thread_index) on `threads` threads (fewer when nested inside another parallel region or built
// without OpenMP); returns when all are done.
template <typename F>
void run_on_threads(int64_t threads, F&& fn) {
#ifdef _OPENMP
    if (threads > 1 && !omp_in_parallel()) {
#pragma omp parallel num_threads(static_cast<int>(threads))
        fn(static_cast<int64_t>(omp_get_thread_num()));
        return;
    }
#endif
    fn(0);
}

// fn(i, state) once for each i in [0, count), on up to `threads` threads, each with its own state made
// once by make_state() (scratch buffers); indices are handed out through a counter, so whatever number
// of threads the pool gives (one when nested or without OpenMP) covers them all, and items of uneven
// cost balance.
template <typename MakeState, typename F>
void for_each_index(int64_t count, int64_t threads, MakeState&& make_state, F&& fn) {
    std::atomic<int64_t> next{0};
    run_on_threads(std::min(threads, count), [&](int64_t) {
        auto state = make_state();
        for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) fn(i, state);
    });
}

// fn(r) once for each r in [0, count), on up to `count` threads (see for_each_index).
template <typename F>
void for_each_range(int64_t count, F&& fn) {
    for_each_index(count, count, [] { return 0; }, [&](int64_t r, int) { fn(r); });
}

// Below about 64K values a parallel region costs more than it saves.
constexpr int64_t kMinValuesPerThread = int64_t(1) << 16;

// fn(begin, end) over [0, n) items of item_size values each, in contiguous ranges whose bounds are
// multiples of 64 items (cache lines of floats when items are floats). A range's bounds depend only
// on n and the thread count, so results that sum per range are reproducible.
template <typename F>
void parallel_ranges(int64_t n, int64_t item_size, int num_threads, F&& fn) {
    constexpr int64_t kAlign = 64;
    const int64_t by_work = n * item_size / kMinValuesPerThread;
    const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, by_work));
    if (threads == 1) {
        fn(0, n);
        return;
    }
    const int64_t per = ((n + threads - 1) / threads + kAlign - 1) / kAlign * kAlign;
    for_each_range(threads, [&](int64_t t) {
        const int64_t begin = std::min(n, t * per), end = std::min(n, begin + per);
        if (begin < end) fn(begin, end);
    });
}

}  // namespace spice_parallel
