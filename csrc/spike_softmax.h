// Spike-Softmax (SPEC.md §3): what the CPU and CUDA kernels share.
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "poison.h"

namespace spikekernels {

// x viewed as [T, R, N]: T steps, R = prod(*rows) rows, N entries per row.
struct SoftmaxDims {
  int64_t steps;
  int64_t rows;
  int64_t row_len;
};

// Checks the op's arguments (dtype -> TypeError; rank, T == 0, state shape and device ->
// ValueError), each message naming the argument. Device-agnostic: both kernels call it.
SoftmaxDims check_spike_softmax_args(
    const at::Tensor& x,
    const std::optional<at::Tensor>& x_acc,
    const std::optional<at::Tensor>& y_prev);

// The inputs a kernel reads (contiguous) and the tensors it writes (fresh, uninitialised, or
// poisoned under SPIKEKERNELS_POISON=1, see poison.h):
// ``out`` like x, the outgoing state ``acc`` (running sum X) and ``y`` (Y_prev), float32.
struct SoftmaxBuffers {
  at::Tensor x;
  std::optional<at::Tensor> x_acc;
  std::optional<at::Tensor> y_prev;
  at::Tensor out;
  at::Tensor acc;
  at::Tensor y;
};

inline SoftmaxBuffers make_spike_softmax_buffers(
    const at::Tensor& x_in,
    const std::optional<at::Tensor>& x_acc_in,
    const std::optional<at::Tensor>& y_prev_in) {
  SoftmaxBuffers b;
  b.x = x_in.contiguous();
  if (x_acc_in.has_value()) {
    b.x_acc = x_acc_in->contiguous();
  }
  if (y_prev_in.has_value()) {
    b.y_prev = y_prev_in->contiguous();
  }
  const auto state_shape = b.x.sizes().slice(1);
  b.out = poisoned(at::empty(b.x.sizes(), b.x.options()));
  b.acc = poisoned(at::empty(state_shape, b.x.options().dtype(at::kFloat)));
  b.y = poisoned(at::empty(state_shape, b.x.options().dtype(at::kFloat)));
  return b;
}

}  // namespace spikekernels
