// handgrad._C: the Python extension module. Loading it runs the static
// TORCH_LIBRARY registrations of every op compiled into the same library;
// the module itself only exposes build information.
#include "build_info.h"
#include "common/cpu_gemm.h"
#include "common/cpu_gemm_decision_file.h"
#include "common/cpu_gemm_policy.h"
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

  namespace gemm = handgrad::cpu_gemm;
  m.def(
      "cpu_gemm_policy", [] { return std::string(gemm::policy_name(gemm::policy())); },
      "The CPU matrix-product policy: own, blas or auto.");
  m.def(
      "set_cpu_gemm_policy",
      [](const std::string& name) {
        if (name == "own") {
          gemm::set_policy(gemm::Policy::own);
        } else if (name == "blas") {
          gemm::set_policy(gemm::Policy::blas);
        } else if (name == "auto") {
          gemm::set_policy(gemm::Policy::automatic);
        } else {
          throw py::value_error("cpu gemm policy must be 'own', 'blas' or 'auto', got '" + name +
                                "'");
        }
      },
      "Forces the kernel of handgrad's CPU matrix products (own, blas) or measures (auto).");
  m.def(
      "cpu_gemm_decisions",
      [] {
        py::list out;
        for (const gemm::Decision& d : gemm::decisions()) {
          py::dict e;
          e["m"] = d.problem.m;
          e["n"] = d.problem.n;
          e["k"] = d.problem.k;
          e["a_transposed"] = d.problem.a_transposed;
          e["b_transposed"] = d.problem.b_transposed;
          e["site"] = gemm::site_name(d.problem.site);
          e["calling_thread"] = d.problem.calling_thread;
          e["threads"] = d.threads;
          e["dtype"] = "float32";
          e["own_us"] = d.own_seconds * 1e6;
          e["blas_us"] = d.blas_seconds * 1e6;
          e["kernel"] = d.kernel == gemm::Kernel::own ? "own" : "blas";
          e["stored"] = d.stored;
          out.append(e);
        }
        return out;
      },
      "The measured CPU matrix-product decisions of this process, in order.");
  m.def("cpu_gemm_tuning_seconds", &gemm::tuning_seconds,
        "Seconds this process spent measuring CPU matrix-product kernels.");
  m.def("clear_cpu_gemm_decisions", &gemm::clear_decisions,
        "Forgets this process's decisions (read from the decision file or measured again).");
  m.def("cpu_gemm_decision_file", &gemm::decision_file::path,
        "The file that stores the measured decisions ('' = none).");
  m.def("set_cpu_gemm_decision_file", &gemm::decision_file::set_path,
        "Stores and reads the measured decisions in this file from now on ('' = none).");
  m.def(
      "cpu_kernels",
      [] {
        py::dict d;
        d["own_gemm_available"] = gemm::available();
        d["isa"] = gemm::available() ? "AVX-512 (F/VL, chosen at run time)"
                                     : "compile-time baseline (no AVX-512 kernels)";
        d["gemm_policy"] = std::string(gemm::policy_name(gemm::policy()));
        d["blas"] = gemm::blas_name();
        return d;
      },
      "Which CPU kernels run on this machine.");

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
