// Python module init for spikekernels._C. The ops register themselves with TORCH_LIBRARY in
// their own translation units; importing this module loads them into torch.ops.spikekernels.
#include <Python.h>

#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "spikekernels C++/CUDA ops; use them through torch.ops.spikekernels";
  // Whether this build compiled the CUDA kernels (csrc/cuda/*.cu): setup.py defines
  // SPIKEKERNELS_WITH_CUDA exactly when it adds them. The one source for that fact
  // (spikekernels.info, bench/device_check.sh).
#ifdef SPIKEKERNELS_WITH_CUDA
  m.attr("with_cuda") = pybind11::bool_(true);
#else
  m.attr("with_cuda") = pybind11::bool_(false);
#endif
}
