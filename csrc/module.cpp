// Python module init for spikekernels._C. The ops register themselves with TORCH_LIBRARY in
// their own translation units; importing this module loads them into torch.ops.spikekernels.
#include <Python.h>

#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "spikekernels C++/CUDA ops; use them through torch.ops.spikekernels";
}
