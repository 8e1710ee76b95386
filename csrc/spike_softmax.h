// Spike-Softmax (SPEC.md §3): what the CPU and CUDA kernels share.
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>

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

}  // namespace spikekernels
