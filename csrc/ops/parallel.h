// Splitting element-wise work over a few threads started per call (no pool: the kernels of ops/ run
// between torch's OpenMP regions, and a call is only split when each thread gets enough work).
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace spice_ops {

// Below about 64K values a thread costs more to start than it saves.
constexpr int64_t kMinValuesPerThread = int64_t(1) << 16;

// fn(begin, end) over [0, n) items of item_size values each, in contiguous ranges whose bounds are
// multiples of 64 items (cache lines of floats when items are floats).
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
    std::vector<std::thread> pool;
    pool.reserve(threads - 1);
    for (int64_t t = 1; t < threads; ++t) {
        const int64_t begin = std::min(n, t * per), end = std::min(n, begin + per);
        if (begin < end) pool.emplace_back([&fn, begin, end] { fn(begin, end); });
    }
    fn(0, std::min(n, per));
    for (auto& t : pool) t.join();
}

}  // namespace spice_ops
