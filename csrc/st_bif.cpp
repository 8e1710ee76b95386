// ST-BIF neuron (SPEC.md §2), C++ CPU kernel: the internal op spikekernels::st_bif_cpu, the
// CPU runtime path of spikekernels.st_bif when the Triton interpreter is off.
//
// Per element, membrane v (float32, in units of the threshold) and count s (an integer; the
// op's argument `count`):
//   v = v + u_t / theta            (float32, a correctly rounded division)
//   sigma = +1 if v >= 1 and s < p_max; -1 if v < 0 and s > n_min; else 0
//   s = s + sigma;  v = v - sigma; output sigma (int8) or sigma * theta (x.dtype)
// Bit-exact with reference.st_bif: the same float32 operations in the same order, no
// contraction across the division, no fast-math. Fresh state v = 0.5, s = 0 of
// reference.count_dtype(n_min, p_max).
//
// at::parallel_for over elements; each thread walks its elements in blocks that stay in L1
// across the T loop (the state lives directly in the fresh outgoing v and s tensors).
#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "poison.h"

namespace spikekernels {
namespace {

// Elements per block: v (1 KiB) and s stay in L1 over the T loop; the inner loop vectorises.
constexpr int64_t kBlock = 256;

// The narrowest signed integer dtype holding every count in [n_min, p_max]
// (reference.count_dtype).
at::ScalarType count_dtype(int64_t n_min, int64_t p_max) {
  auto fits = [&](int64_t lo, int64_t hi) { return lo <= n_min && p_max <= hi; };
  if (fits(INT8_MIN, INT8_MAX)) {
    return at::kChar;
  }
  if (fits(INT16_MIN, INT16_MAX)) {
    return at::kShort;
  }
  if (fits(INT32_MIN, INT32_MAX)) {
    return at::kInt;
  }
  return at::kLong;
}

template <typename scalar_t, typename count_t, typename out_t>
void st_bif_elements(
    const scalar_t* __restrict__ x,  // [T, M]
    out_t* __restrict__ out,  // [T, M]
    float* __restrict__ v,  // [M], holding the incoming state
    count_t* __restrict__ s,  // [M], holding the incoming state
    float theta,
    int64_t n_min,
    int64_t p_max,
    int64_t steps,
    int64_t numel,
    int64_t begin,
    int64_t end) {
  const count_t lo = static_cast<count_t>(n_min);
  const count_t hi = static_cast<count_t>(p_max);
  for (int64_t block = begin; block < end; block += kBlock) {
    const int64_t block_end = std::min(end, block + kBlock);
    for (int64_t t = 0; t < steps; ++t) {
      const scalar_t* x_t = x + t * numel;
      out_t* out_t_ptr = out + t * numel;
      for (int64_t i = block; i < block_end; ++i) {
        const float vi = v[i] + static_cast<float>(x_t[i]) / theta;
        const count_t si = s[i];
        const int8_t sigma = static_cast<int8_t>(vi >= 1.0f && si < hi) -
            static_cast<int8_t>(vi < 0.0f && si > lo);
        s[i] = static_cast<count_t>(si + sigma);
        v[i] = vi - static_cast<float>(sigma);
        if constexpr (std::is_same_v<out_t, int8_t>) {
          out_t_ptr[i] = sigma;
        } else {
          out_t_ptr[i] = static_cast<out_t>(static_cast<float>(sigma) * theta);
        }
      }
    }
  }
}

template <typename scalar_t, typename count_t, typename out_t>
void run_typed(
    const at::Tensor& x,
    const std::optional<at::Tensor>& v_in,
    const std::optional<at::Tensor>& s_in,
    at::Tensor& out,
    at::Tensor& v,
    at::Tensor& s,
    float theta,
    int64_t n_min,
    int64_t p_max) {
  const int64_t steps = x.size(0);
  const int64_t numel = steps == 0 ? 0 : x.numel() / steps;
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  out_t* out_ptr = out.mutable_data_ptr<out_t>();
  float* v_ptr = v.mutable_data_ptr<float>();
  count_t* s_ptr = s.mutable_data_ptr<count_t>();
  const float* v_in_ptr = v_in.has_value() ? v_in->const_data_ptr<float>() : nullptr;
  const count_t* s_in_ptr = s_in.has_value() ? s_in->const_data_ptr<count_t>() : nullptr;
  // ~32k element-steps per task.
  const int64_t grain = std::max<int64_t>(kBlock, 32768 / std::max<int64_t>(1, steps));
  at::parallel_for(0, numel, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      v_ptr[i] = v_in_ptr != nullptr ? v_in_ptr[i] : 0.5f;
      s_ptr[i] = s_in_ptr != nullptr ? s_in_ptr[i] : count_t{0};
    }
    st_bif_elements<scalar_t, count_t, out_t>(
        x_ptr, out_ptr, v_ptr, s_ptr, theta, n_min, p_max, steps, numel, begin, end);
  });
}

template <typename scalar_t, typename count_t>
void run_count(
    const at::Tensor& x,
    const std::optional<at::Tensor>& v_in,
    const std::optional<at::Tensor>& s_in,
    at::Tensor& out,
    at::Tensor& v,
    at::Tensor& s,
    float theta,
    int64_t n_min,
    int64_t p_max,
    bool float_out) {
  if (float_out) {
    run_typed<scalar_t, count_t, scalar_t>(x, v_in, s_in, out, v, s, theta, n_min, p_max);
  } else {
    run_typed<scalar_t, count_t, int8_t>(x, v_in, s_in, out, v, s, theta, n_min, p_max);
  }
}

template <typename scalar_t>
void run_scalar(
    const at::Tensor& x,
    const std::optional<at::Tensor>& v_in,
    const std::optional<at::Tensor>& s_in,
    at::Tensor& out,
    at::Tensor& v,
    at::Tensor& s,
    float theta,
    int64_t n_min,
    int64_t p_max,
    bool float_out) {
  switch (s.scalar_type()) {
    case at::kChar:
      run_count<scalar_t, int8_t>(x, v_in, s_in, out, v, s, theta, n_min, p_max, float_out);
      break;
    case at::kShort:
      run_count<scalar_t, int16_t>(x, v_in, s_in, out, v, s, theta, n_min, p_max, float_out);
      break;
    case at::kInt:
      run_count<scalar_t, int32_t>(x, v_in, s_in, out, v, s, theta, n_min, p_max, float_out);
      break;
    case at::kLong:
      run_count<scalar_t, int64_t>(x, v_in, s_in, out, v, s, theta, n_min, p_max, float_out);
      break;
    default:
      TORCH_CHECK_TYPE(false, "st_bif_cpu: count must have an integer dtype, got ", s.scalar_type());
  }
}

bool is_count_dtype(at::ScalarType t) {
  return t == at::kChar || t == at::kShort || t == at::kInt || t == at::kLong;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> st_bif_cpu(
    const at::Tensor& x_in,
    const at::Tensor& threshold,
    int64_t n_min,
    int64_t p_max,
    const std::optional<at::Tensor>& v_in_opt,
    const std::optional<at::Tensor>& s_in_opt,
    bool float_out) {
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK_TYPE(
      dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
      "st_bif_cpu: x must have dtype in (float32, float16, bfloat16), got ", dtype);
  TORCH_CHECK_VALUE(
      x_in.dim() >= 1, "st_bif_cpu: x must be time-major [T, ...], got a 0-d tensor");
  TORCH_CHECK_VALUE(
      x_in.size(0) > 0, "st_bif_cpu: x has T == 0 time steps; give at least one step");
  TORCH_CHECK_TYPE(
      at::isFloatingType(threshold.scalar_type()),
      "st_bif_cpu: threshold must be a floating tensor, got ", threshold.scalar_type());
  TORCH_CHECK_VALUE(
      threshold.numel() == 1,
      "st_bif_cpu: threshold must have exactly one element, got shape ", threshold.sizes());
  TORCH_CHECK_VALUE(
      threshold.device() == x_in.device(),
      "st_bif_cpu: threshold is on ", threshold.device(), " but x is on ", x_in.device());
  TORCH_CHECK_VALUE(
      n_min <= 0 && 0 <= p_max,
      "st_bif_cpu: level bounds must contain 0 (the fresh count): [", n_min, ", ", p_max, "]");
  TORCH_CHECK_VALUE(
      v_in_opt.has_value() == s_in_opt.has_value(),
      "st_bif_cpu: give the incoming state as both v and count, or neither");
  const auto shape = x_in.sizes().slice(1);
  if (v_in_opt.has_value()) {
    const at::Tensor& v = *v_in_opt;
    const at::Tensor& s = *s_in_opt;
    TORCH_CHECK_TYPE(
        v.scalar_type() == at::kFloat, "st_bif_cpu: v must have dtype float32, got ",
        v.scalar_type());
    TORCH_CHECK_TYPE(
        is_count_dtype(s.scalar_type()), "st_bif_cpu: count must have an integer dtype, got ",
        s.scalar_type());
    TORCH_CHECK_VALUE(
        v.sizes() == shape, "st_bif_cpu: v must have shape ", shape, ", got ", v.sizes());
    TORCH_CHECK_VALUE(
        s.sizes() == shape, "st_bif_cpu: count must have shape ", shape, ", got ", s.sizes());
    TORCH_CHECK_VALUE(
        v.device() == x_in.device() && s.device() == x_in.device(),
        "st_bif_cpu: v and count must be on x's device ", x_in.device());
  }
  const at::ScalarType s_dtype =
      s_in_opt.has_value() ? s_in_opt->scalar_type() : count_dtype(n_min, p_max);
  // Counts are compared in s's dtype: the bounds must fit it.
  TORCH_CHECK_VALUE(
      at::elementSize(count_dtype(n_min, p_max)) <= at::elementSize(s_dtype),
      "st_bif_cpu: count has dtype ", s_dtype, ", which cannot hold counts in [", n_min, ", ",
      p_max, "]");

  const at::Tensor x = x_in.contiguous();
  std::optional<at::Tensor> v_in, s_in;
  if (v_in_opt.has_value()) {
    v_in = v_in_opt->contiguous();
    s_in = s_in_opt->contiguous();
  }
  // reference.st_bif: theta = threshold.to(float32).
  const float theta = threshold.to(at::kFloat).item<float>();
  at::Tensor out =
      poisoned(at::empty(x.sizes(), x.options().dtype(float_out ? dtype : at::kChar)));
  at::Tensor v = poisoned(at::empty(shape, x.options().dtype(at::kFloat)));
  at::Tensor s = poisoned(at::empty(shape, x.options().dtype(s_dtype)));
  if (x.numel() == 0) {
    return {out, v, s};
  }
  switch (dtype) {
    case at::kFloat:
      run_scalar<float>(x, v_in, s_in, out, v, s, theta, n_min, p_max, float_out);
      break;
    case at::kHalf:
      run_scalar<at::Half>(x, v_in, s_in, out, v, s, theta, n_min, p_max, float_out);
      break;
    case at::kBFloat16:
      run_scalar<at::BFloat16>(x, v_in, s_in, out, v, s, theta, n_min, p_max, float_out);
      break;
    default:
      TORCH_CHECK_TYPE(false, "st_bif_cpu: unsupported dtype ", dtype);
  }
  return {out, v, s};
}

}  // namespace
}  // namespace spikekernels

// A fragment: the namespace's one TORCH_LIBRARY block is in spike_softmax.cpp.
TORCH_LIBRARY_FRAGMENT(spikekernels, m) {
  m.def(
      "st_bif_cpu(Tensor x, Tensor threshold, int n_min, int p_max, Tensor? v=None, "
      "Tensor? count=None, bool float_out=False) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(spikekernels, CPU, m) {
  m.impl("st_bif_cpu", &spikekernels::st_bif_cpu);
}
