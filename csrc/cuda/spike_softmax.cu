// Spike-Softmax (SPEC.md §3), CUDA kernels. The schema and the argument checks live in
// csrc/spike_softmax.cpp; this file registers the CUDA implementation.
//
// Per row, with state X (running sum) and Y_prev, both float32:
//   X = X + e_t;  Y = softmax(X);  out_t = Y - Y_prev;  Y_prev = Y
// A row whose entries are all -inf gives Y = 0 (reference._masked_softmax), never NaN; a row
// with a NaN entry gives NaN, as in the reference, even when its other entries are -inf.
// Unlike the CPU kernel's, the bits of a row's sum may depend on where the tensors start in
// memory (the 4-wide path needs 16-byte alignment and sums in another order): within SPEC.md
// §8's softmax tolerance, and the same for every chunk of one run (its alignment is fixed).
//
// Rows of up to 1024 entries (attention rows: 50..1024): one warp per row, the whole T loop
// inside the kernel, X and Y_prev in registers, so the input is read once and the output
// written once per step, and the state once per launch. Longer rows: one block per row with
// the state in the outgoing state tensors (L1/L2 resident across the three passes of a step).
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "../spike_softmax.h"

namespace spikekernels {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Warp path: 4 warps (rows) per block; 128 threads keep many blocks resident per SM.
constexpr int kWarpsPerBlock = 4;
// Block path (rows longer than 1024): threads per row.
constexpr int kBlockThreads = 512;
constexpr int kMaxWarpRow = 1024;

__device__ __forceinline__ float neg_inf() {
  return -INFINITY;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  }
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

// kVec consecutive elements, aligned so that one load/store instruction moves them all.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T, int kVec>
__device__ __forceinline__ Pack<T, kVec> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, kVec>*>(p);
}

template <typename T, int kVec>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, kVec>& pack) {
  *reinterpret_cast<Pack<T, kVec>*>(p) = pack;
}

// One warp per row. Lane `lane` owns the kItems packs starting at columns
// (k * 32 + lane) * kVec, so each load instruction of the warp is contiguous (coalesced).
// kVec > 1 only when N % kVec == 0 and every pointer is aligned (checked on the host), so a
// pack is either wholly inside the row or wholly outside.
template <typename scalar_t, int kItems, int kVec>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarpSize) spike_softmax_warp_kernel(
    const scalar_t* __restrict__ x,  // [T, R, N]
    const float* __restrict__ acc_in,  // [R, N] float32, or nullptr for zeros
    const float* __restrict__ y_prev_in,  // [R, N] float32, or nullptr for zeros
    scalar_t* __restrict__ out,  // [T, R, N]
    float* __restrict__ acc_out,  // [R, N] float32
    float* __restrict__ y_prev_out,  // [R, N] float32
    int64_t steps,
    int64_t rows,
    int n) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (row >= rows) {
    return;  // the whole warp leaves together: row is uniform across it
  }
  const int64_t row_off = row * n;
  const int64_t step_stride = rows * static_cast<int64_t>(n);

  float acc[kItems][kVec];
  float y_prev[kItems][kVec];
  bool valid[kItems];
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int col = (k * kWarpSize + lane) * kVec;
    valid[k] = col < n;
    Pack<float, kVec> a{}, y{};
    if (valid[k] && acc_in != nullptr) {
      a = load_pack<float, kVec>(acc_in + row_off + col);
    }
    if (valid[k] && y_prev_in != nullptr) {
      y = load_pack<float, kVec>(y_prev_in + row_off + col);
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      acc[k][j] = a.v[j];
      y_prev[k][j] = y.v[j];
    }
  }

  // Software pipeline: the next step's input is requested before this step's reductions,
  // so its latency hides behind them.
  Pack<scalar_t, kVec> x_next[kItems];
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    if (valid[k]) {
      x_next[k] = load_pack<scalar_t, kVec>(x + row_off + (k * kWarpSize + lane) * kVec);
    }
  }

  for (int64_t t = 0; t < steps; ++t) {
    float max = neg_inf();
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      if (valid[k]) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          acc[k][j] += static_cast<float>(x_next[k].v[j]);
          max = fmaxf(max, acc[k][j]);
        }
      }
    }
    if (t + 1 < steps) {
      const scalar_t* x_t = x + (t + 1) * step_stride + row_off;
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        if (valid[k]) {
          x_next[k] = load_pack<scalar_t, kVec>(x_t + (k * kWarpSize + lane) * kVec);
        }
      }
    }
    max = warp_max(max);
    const bool masked = max == neg_inf();  // no finite entry (fmaxf skips NaN)

    float e[kItems][kVec];
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        // Invalid slots and -inf entries give exp(-inf) = 0. A row with no finite entry
        // skips exp, but keeps its NaN entries: a NaN row is NaN, not a masked row.
        const float a = acc[k][j];
        e[k][j] = !valid[k] ? 0.0f : !masked ? expf(a - max) : (a != a ? a : 0.0f);
        sum += e[k][j];
      }
    }
    sum = warp_sum(sum);
    const bool dead = masked && sum == 0.0f;  // every entry -inf: Y = 0
    const float inv = dead ? 0.0f : 1.0f / sum;

    scalar_t* out_t = out + t * step_stride + row_off;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      if (valid[k]) {
        Pack<scalar_t, kVec> o;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const float y = e[k][j] * inv;
          o.v[j] = static_cast<scalar_t>(y - y_prev[k][j]);
          y_prev[k][j] = y;
        }
        store_pack<scalar_t, kVec>(out_t + (k * kWarpSize + lane) * kVec, o);
      }
    }
  }

#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    if (valid[k]) {
      const int col = (k * kWarpSize + lane) * kVec;
      Pack<float, kVec> a, y;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        a.v[j] = acc[k][j];
        y.v[j] = y_prev[k][j];
      }
      store_pack<float, kVec>(acc_out + row_off + col, a);
      store_pack<float, kVec>(y_prev_out + row_off + col, y);
    }
  }
}

// Block-wide reduction; `scratch` holds kBlockThreads / 32 partials plus the result slot.
// Two barriers: the result is read before any thread can reach the next reduction's writes.
template <bool kMax>
__device__ __forceinline__ float block_reduce(float v, float* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  constexpr int kWarps = kBlockThreads / kWarpSize;
  v = kMax ? warp_max(v) : warp_sum(v);
  if (lane == 0) {
    scratch[warp] = v;
  }
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? scratch[lane] : (kMax ? neg_inf() : 0.0f);
    v = kMax ? warp_max(v) : warp_sum(v);
    if (lane == 0) {
      scratch[kWarps] = v;
    }
  }
  __syncthreads();
  return scratch[kWarps];
}

// One block per row, for rows longer than the warp path holds in registers. Thread i owns
// columns i, i + blockDim, ...; X and Y_prev live in acc_out / y_prev_out, which only the
// owning thread touches, so the reductions are the only cross-thread traffic.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads) spike_softmax_block_kernel(
    const scalar_t* __restrict__ x,  // [T, R, N]
    const float* __restrict__ acc_in,  // [R, N] float32, or nullptr for zeros
    const float* __restrict__ y_prev_in,  // [R, N] float32, or nullptr for zeros
    scalar_t* __restrict__ out,  // [T, R, N]
    float* __restrict__ acc_out,  // [R, N] float32
    float* __restrict__ y_prev_out,  // [R, N] float32
    int64_t steps,
    int64_t rows,
    int n) {
  __shared__ float max_scratch[kBlockThreads / kWarpSize + 1];
  __shared__ float sum_scratch[kBlockThreads / kWarpSize + 1];
  const int64_t row = blockIdx.x;
  const int64_t row_off = row * n;
  const int64_t step_stride = rows * static_cast<int64_t>(n);
  float* acc = acc_out + row_off;
  float* y_prev = y_prev_out + row_off;
  for (int i = threadIdx.x; i < n; i += kBlockThreads) {
    acc[i] = acc_in != nullptr ? acc_in[row_off + i] : 0.0f;
    y_prev[i] = y_prev_in != nullptr ? y_prev_in[row_off + i] : 0.0f;
  }
  for (int64_t t = 0; t < steps; ++t) {
    const scalar_t* x_t = x + t * step_stride + row_off;
    float max = neg_inf();
    for (int i = threadIdx.x; i < n; i += kBlockThreads) {
      const float a = acc[i] + static_cast<float>(x_t[i]);
      acc[i] = a;
      max = fmaxf(max, a);
    }
    max = block_reduce<true>(max, max_scratch);
    const bool masked = max == neg_inf();  // no finite entry (fmaxf skips NaN)
    float sum = 0.0f;
    for (int i = threadIdx.x; i < n; i += kBlockThreads) {
      // as in the warp kernel: a row with no finite entry keeps its NaN entries
      sum += !masked ? expf(acc[i] - max) : (acc[i] != acc[i] ? acc[i] : 0.0f);
    }
    sum = block_reduce<false>(sum, sum_scratch);
    const bool dead = masked && sum == 0.0f;  // every entry -inf: Y = 0
    const float inv = dead ? 0.0f : 1.0f / sum;
    scalar_t* out_t = out + t * step_stride + row_off;
    for (int i = threadIdx.x; i < n; i += kBlockThreads) {
      const float y = dead ? 0.0f : expf(acc[i] - max) * inv;
      out_t[i] = static_cast<scalar_t>(y - y_prev[i]);
      y_prev[i] = y;
    }
  }
}

bool aligned_to(const void* p, size_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

template <typename scalar_t, int kItems, int kVec>
void launch_warp(
    const scalar_t* x,
    const float* acc_in,
    const float* y_prev_in,
    scalar_t* out,
    float* acc_out,
    float* y_prev_out,
    const SoftmaxDims& dims,
    cudaStream_t stream) {
  const int64_t blocks = (dims.rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  spike_softmax_warp_kernel<scalar_t, kItems, kVec>
      <<<static_cast<unsigned>(blocks), kWarpsPerBlock * kWarpSize, 0, stream>>>(
          x, acc_in, y_prev_in, out, acc_out, y_prev_out, dims.steps, dims.rows,
          static_cast<int>(dims.row_len));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Smallest power-of-two number of packs per lane that covers the row.
template <typename scalar_t, int kVec>
void dispatch_warp(
    const scalar_t* x,
    const float* acc_in,
    const float* y_prev_in,
    scalar_t* out,
    float* acc_out,
    float* y_prev_out,
    const SoftmaxDims& dims,
    cudaStream_t stream) {
  const int64_t packs_per_lane = (dims.row_len + kWarpSize * kVec - 1) / (kWarpSize * kVec);
  if (packs_per_lane <= 1) {
    launch_warp<scalar_t, 1, kVec>(x, acc_in, y_prev_in, out, acc_out, y_prev_out, dims, stream);
  } else if (packs_per_lane <= 2) {
    launch_warp<scalar_t, 2, kVec>(x, acc_in, y_prev_in, out, acc_out, y_prev_out, dims, stream);
  } else if (packs_per_lane <= 4) {
    launch_warp<scalar_t, 4, kVec>(x, acc_in, y_prev_in, out, acc_out, y_prev_out, dims, stream);
  } else if (packs_per_lane <= 8) {
    launch_warp<scalar_t, 8, kVec>(x, acc_in, y_prev_in, out, acc_out, y_prev_out, dims, stream);
  } else if constexpr (kVec == 1) {
    if (packs_per_lane <= 16) {
      launch_warp<scalar_t, 16, 1>(x, acc_in, y_prev_in, out, acc_out, y_prev_out, dims, stream);
    } else {
      launch_warp<scalar_t, 32, 1>(x, acc_in, y_prev_in, out, acc_out, y_prev_out, dims, stream);
    }
  }
}

template <typename scalar_t>
void launch(
    const at::Tensor& x,
    const std::optional<at::Tensor>& x_acc,
    const std::optional<at::Tensor>& y_prev,
    at::Tensor& out,
    at::Tensor& acc,
    at::Tensor& y,
    const SoftmaxDims& dims) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const float* acc_in = x_acc.has_value() ? x_acc->const_data_ptr<float>() : nullptr;
  const float* y_prev_in = y_prev.has_value() ? y_prev->const_data_ptr<float>() : nullptr;
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
  float* acc_ptr = acc.mutable_data_ptr<float>();
  float* y_ptr = y.mutable_data_ptr<float>();
  if (dims.row_len > kMaxWarpRow) {
    TORCH_CHECK_VALUE(
        dims.row_len <= INT32_MAX && dims.rows <= INT32_MAX,
        "spike_softmax: x is too large for the CUDA kernel (rows ", dims.rows, ", row length ",
        dims.row_len, ")");
    spike_softmax_block_kernel<scalar_t><<<static_cast<unsigned>(dims.rows), kBlockThreads, 0,
                                           stream>>>(
        x_ptr, acc_in, y_prev_in, out_ptr, acc_ptr, y_ptr, dims.steps, dims.rows,
        static_cast<int>(dims.row_len));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  TORCH_CHECK_VALUE(
      (dims.rows + kWarpsPerBlock - 1) / kWarpsPerBlock <= INT32_MAX,
      "spike_softmax: x has too many rows for the CUDA kernel (", dims.rows, ")");
  // 16-byte packs of state, and kVec = 4 elements of x / out, when every row starts aligned.
  constexpr int kVec = 4;
  const bool vectorise = dims.row_len % kVec == 0 && aligned_to(x_ptr, sizeof(scalar_t) * kVec) &&
      aligned_to(out_ptr, sizeof(scalar_t) * kVec) && aligned_to(acc_in, 16) &&
      aligned_to(y_prev_in, 16) && aligned_to(acc_ptr, 16) && aligned_to(y_ptr, 16);
  if (vectorise) {
    dispatch_warp<scalar_t, kVec>(x_ptr, acc_in, y_prev_in, out_ptr, acc_ptr, y_ptr, dims, stream);
  } else {
    dispatch_warp<scalar_t, 1>(x_ptr, acc_in, y_prev_in, out_ptr, acc_ptr, y_ptr, dims, stream);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spike_softmax_cuda(
    const at::Tensor& x_in,
    const std::optional<at::Tensor>& x_acc_in,
    const std::optional<at::Tensor>& y_prev_in) {
  const SoftmaxDims dims = check_spike_softmax_args(x_in, x_acc_in, y_prev_in);
  TORCH_CHECK_VALUE(x_in.is_cuda(), "spike_softmax: x is on ", x_in.device(), ", expected CUDA");
  const c10::cuda::CUDAGuard guard(x_in.device());
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
  switch (x.scalar_type()) {
    case at::kFloat:
      launch<float>(x, x_acc, y_prev, out, acc, y, dims);
      break;
    case at::kHalf:
      launch<at::Half>(x, x_acc, y_prev, out, acc, y, dims);
      break;
    case at::kBFloat16:
      launch<at::BFloat16>(x, x_acc, y_prev, out, acc, y, dims);
      break;
    default:
      TORCH_CHECK_TYPE(false, "spike_softmax: unsupported dtype ", x.scalar_type());
  }
  return {out, acc, y};
}

}  // namespace
}  // namespace spikekernels

TORCH_LIBRARY_IMPL(spikekernels, CUDA, m) {
  m.impl("spike_softmax", &spikekernels::spike_softmax_cuda);
}
