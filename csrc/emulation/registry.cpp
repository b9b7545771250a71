// The emulated CUDA kernels as a switchable set of CPU kernels.
//
// Each emulated .cu file leaves its TORCH_LIBRARY_IMPL(handgrad, CUDA, m)
// block here as a function (kernel_unit.h). Switching emulation on builds a
// torch::Library for the handgrad namespace on the CPU dispatch key and runs
// those functions on it: the dispatcher then sends CPU tensors to the CUDA
// kernels (through the same drivers, autograd formulas, fake kernels and
// torch.compile paths as real CUDA tensors), until emulation is switched
// off and the library's destruction brings the CPU kernels back.
#include "emulation/registry.h"

#include <torch/library.h>

#include <c10/util/Exception.h>

#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace handgrad {
namespace cuda_emulation {
namespace {

struct Entry {
  RegisterKernels fn;
  const char* file;
};

std::vector<Entry>& entries() {
  static std::vector<Entry> list;
  return list;
}

std::mutex g_mutex;
std::unique_ptr<torch::Library> g_library;

// The dispatcher warns when a kernel replaces another one for the same key;
// here that replacement is the point.
class QuietOverrides : public c10::WarningHandler {
 public:
  void process(const c10::Warning& warning) override {
    if (warning.msg().find("Overriding a previously registered kernel") == std::string::npos) {
      previous_->process(warning);
    }
  }
  explicit QuietOverrides(c10::WarningHandler* previous) : previous_(previous) {}

 private:
  c10::WarningHandler* previous_;
};

}  // namespace

Registrar::Registrar(const char* ns, const char* key, RegisterKernels fn, const char* file) {
  TORCH_CHECK(std::string(ns) == "handgrad" && std::string(key) == "CUDA",
              "CUDA emulation: ", file, " registers kernels for ", ns, "/", key,
              "; only handgrad/CUDA blocks can be emulated");
  entries().push_back({fn, file});
}

void set_enabled(bool on) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (on == static_cast<bool>(g_library)) return;
  if (!on) {
    g_library.reset();
    return;
  }
  QuietOverrides quiet(c10::WarningUtils::get_warning_handler());
  c10::WarningUtils::WarningHandlerGuard guard(&quiet);
  auto library = std::make_unique<torch::Library>(torch::Library::IMPL, "handgrad",
                                                  c10::DispatchKey::CPU, __FILE__, __LINE__);
  for (const Entry& e : entries()) e.fn(*library);
  g_library = std::move(library);
}

bool enabled() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return static_cast<bool>(g_library);
}

std::vector<std::string> emulated_files() {
  std::vector<std::string> files;
  for (const Entry& e : entries()) files.push_back(e.file);
  return files;
}

}  // namespace cuda_emulation
}  // namespace handgrad
