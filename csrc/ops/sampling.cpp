// Token sampling over rows of logits (see sampling.h).
#include "ops/sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "parallel.h"
#include "vec.h"

namespace spice_ops {
namespace {

using namespace spice_vec;

constexpr int64_t kBlock = 64;  // values per partial sum of the plain inverse-CDF search
// Histogram of how far each logit lies below the row's maximum (when the set reaches past kReach):
// kBucketsPerNat buckets per unit, the last holding everything kNumBuckets / kBucketsPerNat or more below.
constexpr int kBucketsPerNat = 16;
constexpr int kNumBuckets = 1024;

struct Scratch {
    std::vector<float> s;       // scaled logits (when T != 1)
    std::vector<float> e;       // e^(s - max)
    std::vector<double> block;  // sums of e over blocks of kBlock values
    std::vector<int32_t> bucket;
    std::vector<std::pair<float, int64_t>> candidates;
};

// The maximum of s, where s = x / t written to out, or s = x when out is null; NaN compares false and
// is skipped.
SPICE_CLONES float scale_and_max(const float* x, float t, float* out, int64_t n) {
    f32x16 vmax = f32x16{} - std::numeric_limits<float>::infinity();
    int64_t i = 0;
    const float* src = out != nullptr ? out : x;
    if (out != nullptr) {
        for (; i + kLanes <= n; i += kLanes) store16(out + i, load16(x + i) / t);
        for (; i < n; ++i) out[i] = x[i] / t;
        i = 0;
    }
    for (; i + kLanes <= n; i += kLanes) {
        const f32x16 v = load16(src + i);
        vmax = v > vmax ? v : vmax;
    }
    float m = -std::numeric_limits<float>::infinity();
    for (int l = 0; l < kLanes; ++l) m = std::max(m, vmax[l]);
    for (; i < n; ++i) m = src[i] > m ? src[i] : m;
    return m;
}

// e = e^(s - m) and the sums of e over blocks of kBlock values (float lanes, each block's sum in double).
SPICE_CLONES void exp_and_block_sums(const float* s, float m, float* e, double* block, int64_t n) {
    for (int64_t b = 0; b * kBlock < n; ++b) {
        const int64_t begin = b * kBlock, end = std::min(n, begin + kBlock);
        f32x16 acc = {};
        int64_t i = begin;
        for (; i + kLanes <= end; i += kLanes) {
            const f32x16 v = exp_nonpositive(load16(s + i) - m);
            store16(e + i, v);
            acc += v;
        }
        double sum = hsum(acc);
        for (; i < end; ++i) {
            e[i] = std::exp(s[i] - m);
            sum += e[i];
        }
        block[b] = sum;
    }
}

// The first index whose cumulative value (from `begin`) exceeds target, searched over kBlock sums then
// within one block; rounding that runs past the end lands on the last value with mass.
int64_t inverse_cdf(const float* e, const double* block, int64_t n, double target) {
    const int64_t num_blocks = (n + kBlock - 1) / kBlock;
    double before = 0.0;
    int64_t b = 0;
    for (; b < num_blocks; ++b) {
        if (before + block[b] > target) break;
        before += block[b];
    }
    if (b < num_blocks) {
        const int64_t begin = b * kBlock, end = std::min(n, begin + kBlock);
        double acc = before;
        for (int64_t i = begin; i < end; ++i) {
            acc += e[i];
            if (e[i] > 0.f && acc > target) return i;
        }
    }
    for (int64_t i = n - 1; i > 0; --i)
        if (e[i] > 0.f) return i;
    return 0;
}

int64_t first_index_of(const float* x, int64_t n, float value) {
    for (int64_t i = 0; i < n; ++i)
        if (x[i] == value) return i;
    return 0;
}

// Mass and count of the tokens less than kReach[j] below the maximum, for each j, in one vector pass.
constexpr int kNumReach = 4;
constexpr float kReach[kNumReach] = {2.f, 4.f, 8.f, 16.f};
// More candidates than this within reach: the histogram bounds the set more tightly than a reach does.
constexpr int64_t kMaxReachCandidates = 2048;

SPICE_CLONES void reach_sums(const float* s, float m, const float* e, int64_t n, double* mass, int64_t* count) {
    f32x16 vm[kNumReach] = {}, vc[kNumReach] = {};
    const f32x16 zero = {}, one = zero + 1.f;
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
        const f32x16 d = m - load16(s + i), v = load16(e + i);
        for (int j = 0; j < kNumReach; ++j) {
            vm[j] += d < kReach[j] ? v : zero;
            vc[j] += d < kReach[j] ? one : zero;
        }
    }
    for (int j = 0; j < kNumReach; ++j) {
        mass[j] = hsum(vm[j]);
        count[j] = static_cast<int64_t>(hsum(vc[j]));
    }
    for (; i < n; ++i)
        for (int j = 0; j < kNumReach; ++j)
            if (m - s[i] < kReach[j]) {
                mass[j] += e[i];
                ++count[j];
            }
}

// Indices of the tokens less than `reach` below the maximum; whole vectors without one are skipped.
SPICE_CLONES void collect_within(const float* s, float m, float reach, int64_t n,
                                 std::vector<std::pair<float, int64_t>>& out) {
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
        // the distance computed as reach_sums computes it, so the two agree on every boundary token
        const i32x16 hit = (m - load16(s + i)) < reach;
        bool any = false;
        for (int l = 0; l < kLanes; ++l) any |= hit[l] != 0;
        if (!any) continue;
        for (int l = 0; l < kLanes; ++l)
            if (m - s[i + l] < reach) out.emplace_back(s[i + l], i + l);
    }
    for (; i < n; ++i)
        if (m - s[i] < reach) out.emplace_back(s[i], i);
}

// Candidates through a histogram of the distances below the maximum: whole buckets while the tokens
// before them can still be kept. Slower than collect_within (a scalar scatter), for wide sets only.
void collect_by_histogram(const float* s, float m, const float* e, int64_t n, bool has_k, int64_t top_k,
                          double limit, Scratch& w) {
    w.bucket.resize(n);
    std::vector<double> mass(kNumBuckets, 0.0);
    std::vector<int64_t> count(kNumBuckets, 0);
    for (int64_t i = 0; i < n; ++i) {
        const float d = (m - s[i]) * kBucketsPerNat;  // >= 0; +inf for -inf logits
        const int b = d < kNumBuckets - 1 ? static_cast<int>(d) : kNumBuckets - 1;
        w.bucket[i] = b;
        mass[b] += e[i];
        ++count[b];
    }
    int last = kNumBuckets - 1;
    double mass_before = 0.0;
    int64_t count_before = 0;
    for (int b = 0; b < kNumBuckets; ++b) {
        if (has_k ? count_before >= top_k : mass_before >= limit) {
            last = b - 1;
            break;
        }
        mass_before += mass[b];
        count_before += count[b];
    }
    for (int64_t i = 0; i < n; ++i)
        if (w.bucket[i] <= last) w.candidates.emplace_back(s[i], i);
}

// Tokens that can be in the top-k / top-p set, sorted by s (descending, ties by index), then the draw.
int64_t sample_filtered(const float* s, float m, const float* e, double total, int64_t n, int64_t top_k,
                        float top_p, float u, Scratch& w) {
    // A token can be kept while fewer than top_k tokens precede it, or (no top-k) while less than
    // top_p of the mass does; the margin is far above the rounding of the sums.
    const bool has_k = top_k > 0 && top_k < n;
    const double limit = top_p * total * (1.0 + 1e-5);
    double mass[kNumReach];
    int64_t count[kNumReach];
    reach_sums(s, m, e, n, mass, count);
    w.candidates.clear();
    int j = 0;
    while (j < kNumReach && (has_k ? count[j] < top_k : mass[j] < limit)) ++j;
    // the usual case: a set within a few units of the maximum, and few tokens to sort
    if (j < kNumReach && count[j] <= kMaxReachCandidates)
        collect_within(s, m, kReach[j], n, w.candidates);
    else
        collect_by_histogram(s, m, e, n, has_k, top_k, limit, w);
    auto& c = w.candidates;
    auto by_value = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    int64_t num = static_cast<int64_t>(c.size());
    if (has_k) num = std::min(num, top_k);
    std::partial_sort(c.begin(), c.begin() + num, c.end(), by_value);
    double norm = total;
    if (has_k) {
        norm = 0.0;
        for (int64_t i = 0; i < num; ++i) norm += e[c[i].second];
    }
    // keep while the mass before a token is below top_p (the first token always)
    double kept = 0.0;
    int64_t num_kept = 0;
    for (; num_kept < num; ++num_kept) {
        if (num_kept > 0 && kept >= top_p * norm) break;
        kept += e[c[num_kept].second];
    }
    const double target = static_cast<double>(u) * kept;
    double acc = 0.0;
    int64_t pick = 0;
    for (int64_t i = 0; i < num_kept; ++i) {
        const float p = e[c[i].second];
        acc += p;
        if (p > 0.f) pick = i;  // the last kept token with mass, should rounding run past the end
        if (p > 0.f && acc > target) break;
    }
    return c[pick].second;
}

void sample_row(const float* x, int64_t n, float t, float top_p, int64_t top_k, float u, int64_t* token,
                float* logprob, Scratch& w) {
    const bool greedy = t == 0.f;
    const bool divide = !greedy && t != 1.f;
    if (divide) w.s.resize(n);
    const float m = scale_and_max(x, t, divide ? w.s.data() : nullptr, n);
    const float* s = divide ? w.s.data() : x;
    double total = 0.0;
    if (std::isfinite(m)) {
        w.e.resize(n);
        w.block.resize((n + kBlock - 1) / kBlock);
        exp_and_block_sums(s, m, w.e.data(), w.block.data(), n);
        for (double b : w.block) total += b;
    }
    if (!(total > 0.0) || !std::isfinite(total)) {  // no finite logit, or a NaN one
        *token = 0;
        *logprob = std::numeric_limits<float>::quiet_NaN();
        return;
    }
    const float lse = m + static_cast<float>(std::log(total));
    int64_t pick;
    if (greedy)
        pick = first_index_of(x, n, m);  // s = x for greedy rows: the first argmax
    else if ((top_k <= 0 || top_k >= n) && top_p >= 1.f)
        pick = inverse_cdf(w.e.data(), w.block.data(), n, static_cast<double>(u) * total);
    else
        pick = sample_filtered(s, m, w.e.data(), total, n, top_k, top_p, u, w);
    *token = pick;
    *logprob = s[pick] - lse;
}

}  // namespace

void sample_rows(const float* logits, int64_t ld, int64_t rows, int64_t vocab, const float* temps,
                 const float* top_ps, const int64_t* top_ks, const float* us, int64_t* tokens, float* logprobs,
                 int num_threads) {
    spice_parallel::for_each_index(rows, num_threads, [] { return Scratch{}; }, [&](int64_t r, Scratch& w) {
        sample_row(logits + r * ld, vocab, temps[r], top_ps[r], top_ks[r], us[r], tokens + r, logprobs + r, w);
    });
}

}  // namespace spice_ops
