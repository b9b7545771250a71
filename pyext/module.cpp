// handgrad._C: the Python extension module. Loading it runs the static
// TORCH_LIBRARY registrations of every op compiled into the same library;
// the module itself only exposes build information.
#include "build_info.h"
#include "common/memory_tracker.h"
#include "common/scratch_memory.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "handgrad's compiled operators (registered under torch.ops.handgrad)";
  m.def(
      "build_info",
      [] {
        const handgrad::BuildInfo info = handgrad::build_info();
        py::dict d;
        d["version"] = info.version;
        d["cuda_compiled"] = info.cuda_compiled;
        d["cuda_archs"] = info.cuda_archs;
        d["cuda_toolkit_version"] = info.cuda_toolkit_version;
        d["cpu_isa"] = info.cpu_isa;
        d["openmp"] = info.openmp;
        d["compiler"] = info.compiler;
        return d;
      },
      "Facts fixed when this binary was compiled.");

  namespace mem = handgrad::memory;
  m.def("_set_cpu_memory_tracking", &mem::set_cpu_tracking);
  m.def("_cpu_memory_tracking", &mem::cpu_tracking);
  m.def("_cpu_memory_current", &mem::cpu_current_bytes);
  m.def("_cpu_memory_peak", &mem::cpu_peak_bytes);
  m.def("_reset_cpu_memory_peak", &mem::reset_cpu_peak);
  m.def("_scratch_memory_current", &mem::scratch_current_bytes);
  m.def("_scratch_memory_peak", &mem::scratch_peak_bytes);
  m.def("_reset_scratch_memory_peak", &mem::reset_scratch_peak);
}
