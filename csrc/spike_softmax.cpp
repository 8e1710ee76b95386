// Spike-Softmax (SPEC.md §3): the op's schema, its argument checks and its CPU kernel.
//
// Per row, with state X (running sum) and Y_prev, both float32:
//   X = X + e_t;  Y = softmax(X);  out_t = Y - Y_prev;  Y_prev = Y
// A row whose entries are all -inf gives Y = 0 (reference._masked_softmax), never NaN.
//
// CPU kernel: at::parallel_for over rows; each thread takes a tile of rows and runs the whole
// T loop on it, so the tile's state stays in cache and the input and output are touched once
// per step. The state lives directly in the (fresh) outgoing state tensors.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "spike_softmax.h"

namespace spikekernels {

namespace {

void check_state(
    const std::optional<at::Tensor>& state,
    const char* name,
    const at::Tensor& x) {
  if (!state.has_value()) {
    return;
  }
  const at::Tensor& s = *state;
  TORCH_CHECK_TYPE(
      s.scalar_type() == at::kFloat,
      "spike_softmax: ", name, " must have dtype float32, got ", s.scalar_type());
  TORCH_CHECK_VALUE(
      s.sizes() == x.sizes().slice(1),
      "spike_softmax: ", name, " must have shape ", x.sizes().slice(1),
      " (the per-step shape of x), got ", s.sizes());
  TORCH_CHECK_VALUE(
      s.device() == x.device(),
      "spike_softmax: ", name, " is on ", s.device(), " but x is on ", x.device());
}

}  // namespace

SoftmaxDims check_spike_softmax_args(
    const at::Tensor& x,
    const std::optional<at::Tensor>& x_acc,
    const std::optional<at::Tensor>& y_prev) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(
      dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
      "spike_softmax: x must have dtype in (float32, float16, bfloat16), got ", dtype);
  TORCH_CHECK_VALUE(
      x.dim() >= 2,
      "spike_softmax: x must be [T, *rows, N] with at least 2 dims, got shape ", x.sizes());
  TORCH_CHECK_VALUE(
      x.size(0) > 0, "spike_softmax: x has T == 0 time steps; give at least one step");
  check_state(x_acc, "x_acc", x);
  check_state(y_prev, "y_prev", x);
  const int64_t steps = x.size(0);
  const int64_t row_len = x.size(-1);
  const int64_t rows = row_len == 0 ? 0 : x.numel() / (steps * row_len);
  return {steps, rows, row_len};
}

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Rows processed together by one thread: 4096 floats of X and of Y_prev (32 KiB), small
// enough to stay in L2 across the T loop, long enough for the prefetcher to stream each step.
constexpr int64_t kTileElems = 4096;

// Partial sums of the softmax denominator: one AVX-512 register, two AVX2 ones.
constexpr int kSumLanes = 16;

// exp(v) for v <= 0 (softmax's v - max), written without branches or library calls so the
// loops below vectorise: Cephes' expf (range reduction by ln 2 in two parts, degree-5
// polynomial, 2^n by building the exponent bits), ~1 ulp. exp(-inf) is exactly 0 (masked
// entries contribute nothing); NaN propagates (a NaN v computes on kLow, never casts a NaN
// to an integer, and returns v).
inline float exp_nonpositive(float v) {
  constexpr float kLow = -87.33654f;  // below this expf is denormal; flushed to 0
  const float c = v >= kLow ? (v > 0.0f ? 0.0f : v) : kLow;
  // Round c * log2(e) to the nearest integer with the 1.5 * 2^23 trick (exact for |n| < 2^22).
  const float n = (c * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = c - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return v >= kLow ? y * scale : (v < kLow ? 0.0f : v);
}

// One step of one row, all float32: X += x_t; Y = softmax(X); out = Y - Y_prev; Y_prev = Y.
// `e` is scratch of n floats. Cloned for AVX-512 / AVX2 where the compiler supports it, picked
// at load time: the build's SSE2 baseline would use a quarter of an AVX-512 register.
#if defined(__x86_64__) && defined(__linux__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define SPIKEKERNELS_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
#endif
#ifndef SPIKEKERNELS_CPU_CLONES
#define SPIKEKERNELS_CPU_CLONES
#endif

SPIKEKERNELS_CPU_CLONES void softmax_step_row(
    const float* __restrict__ x_t,
    float* __restrict__ acc,
    float* __restrict__ y_prev,
    float* __restrict__ e,
    float* __restrict__ out,
    int64_t n) {
  float max = kNegInf;
  int nan_seen = 0;  // the max skips NaN: a NaN row must not pass for a masked one
#pragma omp simd reduction(max : max) reduction(| : nan_seen)
  for (int64_t i = 0; i < n; ++i) {
    const float a = acc[i] + x_t[i];
    acc[i] = a;
    max = a > max ? a : max;
    nan_seen |= a != a;
  }
  if (max == kNegInf && !nan_seen) {  // every entry -inf (or n == 0): Y = 0
    for (int64_t i = 0; i < n; ++i) {
      out[i] = 0.0f - y_prev[i];
      y_prev[i] = 0.0f;
    }
    return;
  }
  // The sum runs in kSumLanes fixed lanes, combined in a fixed order, so the result depends
  // only on the data: not on pointer alignment, the ISA clone, or how time was chunked.
  float lanes[kSumLanes] = {};
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes) {
#pragma omp simd
    for (int j = 0; j < kSumLanes; ++j) {
      const float v = exp_nonpositive(acc[i + j] - max);
      e[i + j] = v;
      lanes[j] += v;
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    const float v = exp_nonpositive(acc[i] - max);
    e[i] = v;
    lanes[j] += v;
  }
  float sum = 0.0f;
  for (int j = 0; j < kSumLanes; ++j) {
    sum += lanes[j];
  }
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float y = e[i] * inv;
    out[i] = y - y_prev[i];
    y_prev[i] = y;
  }
}

// Rows [begin, end) over all steps. x, out: [T, R, N]; acc, y_prev: [R, N], already holding
// the incoming state.
template <typename scalar_t>
void softmax_rows(
    const scalar_t* x,
    scalar_t* out,
    float* acc,
    float* y_prev,
    const SoftmaxDims& dims,
    int64_t begin,
    int64_t end) {
  constexpr bool kIsFloat = std::is_same_v<scalar_t, float>;
  const int64_t n = dims.row_len;
  const int64_t step_stride = dims.rows * n;
  const int64_t tile_rows = std::max<int64_t>(1, kTileElems / n);
  // e, plus float copies of one row's input and output when x is half precision.
  std::vector<float> scratch(kIsFloat ? n : 3 * n);
  float* e = scratch.data();
  float* x_f = e + n;
  float* out_f = x_f + n;
  for (int64_t tile = begin; tile < end; tile += tile_rows) {
    const int64_t tile_end = std::min(end, tile + tile_rows);
    for (int64_t t = 0; t < dims.steps; ++t) {
      for (int64_t r = tile; r < tile_end; ++r) {
        const int64_t off = t * step_stride + r * n;
        if constexpr (kIsFloat) {
          softmax_step_row(x + off, acc + r * n, y_prev + r * n, e, out + off, n);
        } else {
          for (int64_t i = 0; i < n; ++i) {
            x_f[i] = static_cast<float>(x[off + i]);
          }
          softmax_step_row(x_f, acc + r * n, y_prev + r * n, e, out_f, n);
          for (int64_t i = 0; i < n; ++i) {
            out[off + i] = static_cast<scalar_t>(out_f[i]);
          }
        }
      }
    }
  }
}

void init_state(const std::optional<at::Tensor>& in, float* dst, int64_t begin, int64_t end) {
  if (in.has_value()) {
    std::memcpy(dst + begin, in->const_data_ptr<float>() + begin, (end - begin) * sizeof(float));
  } else {
    std::fill(dst + begin, dst + end, 0.0f);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spike_softmax_cpu(
    const at::Tensor& x_in,
    const std::optional<at::Tensor>& x_acc_in,
    const std::optional<at::Tensor>& y_prev_in) {
  const SoftmaxDims dims = check_spike_softmax_args(x_in, x_acc_in, y_prev_in);
  // Named references, not a structured binding: lambdas below capture them (C++17 builds).
  SoftmaxBuffers buffers = make_spike_softmax_buffers(x_in, x_acc_in, y_prev_in);
  const at::Tensor& x = buffers.x;
  const std::optional<at::Tensor>& x_acc = buffers.x_acc;
  const std::optional<at::Tensor>& y_prev = buffers.y_prev;
  at::Tensor& out = buffers.out;
  at::Tensor& acc = buffers.acc;
  at::Tensor& y = buffers.y;
  if (dims.rows == 0 || dims.row_len == 0) {
    return {out, acc, y};
  }
  float* acc_ptr = acc.mutable_data_ptr<float>();
  float* y_ptr = y.mutable_data_ptr<float>();
  // Enough rows per task that a task does at least ~32k element-steps of work.
  const int64_t grain = std::max<int64_t>(1, 32768 / (dims.steps * dims.row_len));
  auto run = [&](auto* x_ptr, auto* out_ptr) {
    at::parallel_for(0, dims.rows, grain, [&](int64_t begin, int64_t end) {
      init_state(x_acc, acc_ptr, begin * dims.row_len, end * dims.row_len);
      init_state(y_prev, y_ptr, begin * dims.row_len, end * dims.row_len);
      softmax_rows(x_ptr, out_ptr, acc_ptr, y_ptr, dims, begin, end);
    });
  };
  switch (x.scalar_type()) {
    case at::kFloat:
      run(x.const_data_ptr<float>(), out.mutable_data_ptr<float>());
      break;
    case at::kHalf:
      run(x.const_data_ptr<at::Half>(), out.mutable_data_ptr<at::Half>());
      break;
    case at::kBFloat16:
      run(x.const_data_ptr<at::BFloat16>(), out.mutable_data_ptr<at::BFloat16>());
      break;
    default:
      TORCH_CHECK_TYPE(false, "spike_softmax: unsupported dtype ", x.scalar_type());
  }
  return {out, acc, y};
}

}  // namespace

}  // namespace spikekernels

// The one TORCH_LIBRARY block of the namespace (C++ allows only one); the ops defined from
// Python (custom_op / triton_op) register as fragments beside it.
TORCH_LIBRARY(spikekernels, m) {
  m.def(
      "spike_softmax(Tensor x, Tensor? x_acc=None, Tensor? y_prev=None) "
      "-> (Tensor out, Tensor x_acc, Tensor y_prev)");
}

TORCH_LIBRARY_IMPL(spikekernels, CPU, m) {
  m.impl("spike_softmax", &spikekernels::spike_softmax_cpu);
}
