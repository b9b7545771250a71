// handgrad._cuda_emulation: the CUDA kernels compiled for the host emulator
// (csrc/emulation), built with HANDGRAD_CUDA_EMULATION=1. Python reaches it
// through handgrad.cuda_emulation.
#include "emulation/registry.h"
#include "emulation/self_test.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;
namespace emu = handgrad::cuda_emulation;

PYBIND11_MODULE(_cuda_emulation, m) {
  m.doc() = "handgrad's CUDA kernels on the host CUDA emulator";
  m.def("set_enabled", &emu::set_enabled,
        "Route handgrad ops on CPU tensors to the emulated CUDA kernels (or back).");
  m.def("enabled", &emu::enabled);
  m.def("emulated_files", &emu::emulated_files, "The .cu files compiled into this module.");
  m.def("launch_statistics", &emu::launch_statistics,
        "kernel name -> (launches, blocks, threads) since the last reset");
  m.def("reset_launch_statistics", &emu::reset_launch_statistics);
  m.def("_self_test", &emu::run_self_test, py::arg("name"), py::arg("args"),
        py::arg("values") = std::vector<double>(),
        "Runs one of the emulator's own test kernels (tests/test_cuda_emulation.py).");
}
