// C++ CPU kernel of the multi-step ST-BIF neuron (SPEC.md §2): the CPU runtime path of
// spikekernels.st_bif when the Triton interpreter is off. Bit-exact with reference.st_bif:
// a true float32 division (no reciprocal, no fast-math), the same comparisons and updates.
//
// Registered as the internal op spikekernels::_st_bif_cpu; the public op validates its
// arguments in Python (spikekernels/ops/neuron.py) and calls it for CPU tensors.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

namespace spikekernels {
namespace {

using at::Tensor;

// Neurons per block: the block's state lives in two small arrays, the T loop runs inside, and
// the inner loop over neurons is contiguous so the compiler vectorises it.
constexpr int64_t kBlock = 1024;

template <typename in_t, typename out_t, typename count_t>
void st_bif_block(const in_t* x, out_t* out, float* v, count_t* s, int64_t begin, int64_t end,
                  int64_t numel, int64_t steps, float theta, int32_t n_min, int32_t p_max,
                  bool float_out) {
  const int64_t n = end - begin;
  float vb[kBlock];
  int32_t sb[kBlock];
  for (int64_t i = 0; i < n; ++i) {
    vb[i] = v[begin + i];
    sb[i] = static_cast<int32_t>(s[begin + i]);
  }
  for (int64_t t = 0; t < steps; ++t) {
    const in_t* xt = x + t * numel + begin;
    out_t* ot = out + t * numel + begin;
    for (int64_t i = 0; i < n; ++i) {
      float vi = vb[i] + static_cast<float>(xt[i]) / theta;
      const int32_t si = sb[i];
      const int32_t sigma = static_cast<int32_t>(vi >= 1.0f && si < p_max) -
                            static_cast<int32_t>(vi < 0.0f && si > n_min);
      sb[i] = si + sigma;
      vb[i] = vi - static_cast<float>(sigma);
      ot[i] = float_out ? static_cast<out_t>(static_cast<float>(sigma) * theta)
                        : static_cast<out_t>(sigma);
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    v[begin + i] = vb[i];
    s[begin + i] = static_cast<count_t>(sb[i]);
  }
}

std::tuple<Tensor, Tensor, Tensor> st_bif_cpu(const Tensor& x, const Tensor& threshold,
                                              int64_t n_min, int64_t p_max,
                                              const std::optional<Tensor>& v,
                                              const std::optional<Tensor>& s, bool float_out,
                                              at::ScalarType count_dtype) {
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(0) > 0, "x must be [T, ...] with T >= 1");
  TORCH_CHECK_VALUE(threshold.numel() == 1, "threshold must have exactly one element");
  TORCH_CHECK_VALUE(v.has_value() == s.has_value(), "give v and s together, or neither");
  const Tensor xc = x.contiguous();
  const int64_t steps = xc.size(0);
  const int64_t numel = steps == 0 ? 0 : xc.numel() / steps;
  const auto shape = xc.sizes().slice(1);
  const float theta = threshold.to(at::kFloat).item<float>();

  Tensor v_out = v.has_value() ? v->to(at::kFloat).contiguous().clone()
                               : at::full(shape, 0.5, xc.options().dtype(at::kFloat));
  Tensor s_out = s.has_value() ? s->contiguous().clone()
                               : at::zeros(shape, xc.options().dtype(count_dtype));
  Tensor out = at::empty(xc.sizes(), xc.options().dtype(float_out ? xc.scalar_type() : at::kChar));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "st_bif_cpu", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_INTEGRAL_TYPES(s_out.scalar_type(), "st_bif_cpu_count", [&] {
      using count_t = scalar_t;
      const in_t* xp = xc.const_data_ptr<in_t>();
      float* vp = v_out.data_ptr<float>();
      count_t* sp = s_out.data_ptr<count_t>();
      at::parallel_for(0, numel, kBlock, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; b += kBlock) {
          const int64_t e = std::min(end, b + kBlock);
          if (float_out) {
            st_bif_block(xp, out.data_ptr<in_t>(), vp, sp, b, e, numel, steps, theta,
                         static_cast<int32_t>(n_min), static_cast<int32_t>(p_max), true);
          } else {
            st_bif_block(xp, out.data_ptr<int8_t>(), vp, sp, b, e, numel, steps, theta,
                         static_cast<int32_t>(n_min), static_cast<int32_t>(p_max), false);
          }
        }
      });
    });
  });
  return {out, v_out, s_out};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(spikekernels, m) {
  m.def(
      "_st_bif_cpu(Tensor x, Tensor threshold, int n_min, int p_max, Tensor? v, Tensor? s, "
      "bool float_out, ScalarType count_dtype) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(spikekernels, CPU, m) { m.impl("_st_bif_cpu", &st_bif_cpu); }

}  // namespace spikekernels
