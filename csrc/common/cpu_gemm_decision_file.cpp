// The decision file of the CPU GEMM policy (see cpu_gemm_decision_file.h).
#include "common/cpu_gemm_decision_file.h"

#include "common/cpu_gemm.h"

#include <torch/version.h>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <mutex>
#include <sstream>

namespace handgrad {
namespace cpu_gemm {
namespace decision_file {
namespace {

// Bump when class_key() or the line format changes: older lines then stop matching.
constexpr const char* kFormat = "v1";

std::string path_from_env() {
  const char* v = std::getenv("HANDGRAD_CPU_GEMM_CACHE");
  if (v != nullptr) {
    if (*v == '\0' || std::strcmp(v, "0") == 0 || std::strcmp(v, "off") == 0) return "";
    return v;
  }
  const char* xdg = std::getenv("XDG_CACHE_HOME");
  const char* home = std::getenv("HOME");
  std::string base;
  if (xdg != nullptr && *xdg == '/') {
    base = xdg;
  } else if (home != nullptr && *home != '\0') {
    base = std::string(home) + "/.cache";
  } else {
    return "";  // nowhere sensible to keep it
  }
  return base + "/handgrad/cpu_gemm_decisions.txt";
}

std::mutex& path_mutex() {
  static std::mutex m;
  return m;
}

std::string& path_slot() {
  static std::string p = path_from_env();
  return p;
}

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char ch : s) {
    h ^= ch;
    h *= 1099511628211ull;
  }
  return h;
}

// The lines of /proc/cpuinfo that name the processor model: the first
// core's block (up to the first blank line), in a fixed field order.
std::string cpu_model() {
  static constexpr const char* kFields[] = {"vendor_id", "cpu family", "model", "model name",
                                            "stepping"};
  std::string found[std::size(kFields)];
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line) && !line.empty()) {
    const auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string name = line.substr(0, colon);
    name.erase(name.find_last_not_of(" \t") + 1);
    for (size_t i = 0; i < std::size(kFields); ++i) {
      if (name == kFields[i] && found[i].empty()) found[i] = line + "\n";
    }
  }
  std::string out;
  for (const std::string& f : found) out += f;
  return out.empty() ? "unknown cpu" : out;
}

const std::string& machine() {
  static const std::string id = [] {
    std::ostringstream s;
    s << cpu_model() << "own kernel " << available() << "\nblas " << blas_name() << "\ntorch "
      << TORCH_VERSION_MAJOR << "." << TORCH_VERSION_MINOR << "." << TORCH_VERSION_PATCH
      << "\nformat " << kFormat;
    char hex[17];
    std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(fnv1a(s.str())));
    return std::string(hex);
  }();
  return id;
}

bool site_of(const std::string& name, Site& out) {
  for (Site s : {Site::tensor, Site::packed_b, Site::tile}) {
    if (name == site_name(s)) {
      out = s;
      return true;
    }
  }
  return false;
}

std::string line_of(uint64_t key, const Decision& d) {
  char buf[320];
  std::snprintf(buf, sizeof buf, "%s %s %016llx %d %s %.3f %.3f %lld %lld %lld %d %d %s %d\n",
                kFormat, machine().c_str(), static_cast<unsigned long long>(key), d.threads,
                d.kernel == Kernel::own ? "own" : "blas", d.own_seconds * 1e6,
                d.blas_seconds * 1e6, static_cast<long long>(d.problem.m),
                static_cast<long long>(d.problem.n), static_cast<long long>(d.problem.k),
                d.problem.a_transposed ? 1 : 0, d.problem.b_transposed ? 1 : 0,
                site_name(d.problem.site), d.problem.calling_thread ? 1 : 0);
  return buf;
}

// The first well-formed line of this machine for (key, threads), if any.
bool find_line(const std::string& text, uint64_t key, int threads, Decision& out) {
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    std::istringstream f(line);
    std::string format, id, key_hex, kernel, site;
    int t = 0, at = 0, bt = 0, ct = 0;
    double own_us = 0, blas_us = 0;
    long long m = 0, n = 0, k = 0;
    if (!(f >> format >> id >> key_hex >> t >> kernel >> own_us >> blas_us >> m >> n >> k >> at >>
          bt >> site >> ct)) {
      continue;
    }
    if (format != kFormat || id != machine() || t != threads) continue;
    char* end = nullptr;
    const unsigned long long parsed = std::strtoull(key_hex.c_str(), &end, 16);
    if (end == key_hex.c_str() || *end != '\0' || parsed != key) continue;
    if (kernel != "own" && kernel != "blas") continue;
    Decision d;
    if (!site_of(site, d.problem.site)) continue;
    d.problem.m = m;
    d.problem.n = n;
    d.problem.k = k;
    d.problem.a_transposed = at != 0;
    d.problem.b_transposed = bt != 0;
    d.problem.calling_thread = ct != 0;
    d.threads = t;
    d.own_seconds = own_us * 1e-6;
    d.blas_seconds = blas_us * 1e-6;
    d.kernel = kernel == "own" ? Kernel::own : Kernel::blas;
    d.stored = true;
    out = d;
    return true;
  }
  return false;
}

// mkdir -p of the file's folder (errors surface when the file is opened).
void make_parents(const std::string& file) {
  for (size_t slash = file.find('/', 1); slash != std::string::npos;
       slash = file.find('/', slash + 1)) {
    ::mkdir(file.substr(0, slash).c_str(), 0755);
  }
}

void warn_once(const std::string& file, const char* what) {
  static std::once_flag once;
  const int err = errno;
  std::call_once(once, [&] {
    std::fprintf(stderr,
                 "handgrad: cannot %s the CPU GEMM decision file %s (%s); decisions are "
                 "measured per process (set HANDGRAD_CPU_GEMM_CACHE to another file, or to off)\n",
                 what, file.c_str(), std::strerror(err));
  });
}

// An open, exclusively locked file; unlocked and closed on scope exit.
struct LockedFile {
  int fd = -1;
  explicit LockedFile(const std::string& file) {
    make_parents(file);
    fd = ::open(file.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return;
    while (::flock(fd, LOCK_EX) != 0) {
      if (errno != EINTR) {
        ::close(fd);
        fd = -1;
        return;
      }
    }
  }
  ~LockedFile() {
    if (fd >= 0) {
      ::flock(fd, LOCK_UN);
      ::close(fd);
    }
  }
  LockedFile(const LockedFile&) = delete;
  LockedFile& operator=(const LockedFile&) = delete;

  bool read_all(std::string& out) const {
    if (::lseek(fd, 0, SEEK_SET) < 0) return false;
    char buf[65536];
    for (;;) {
      const ssize_t got = ::read(fd, buf, sizeof buf);
      if (got == 0) return true;
      if (got < 0) {
        if (errno == EINTR) continue;
        return false;
      }
      out.append(buf, static_cast<size_t>(got));
    }
  }

  bool append(const std::string& text) const {
    if (::lseek(fd, 0, SEEK_END) < 0) return false;
    size_t done = 0;
    while (done < text.size()) {
      const ssize_t put = ::write(fd, text.data() + done, text.size() - done);
      if (put < 0) {
        if (errno == EINTR) continue;
        return false;
      }
      done += static_cast<size_t>(put);
    }
    return true;
  }
};

}  // namespace

std::string path() {
  std::lock_guard<std::mutex> lock(path_mutex());
  return path_slot();
}

void set_path(const std::string& path) {
  std::lock_guard<std::mutex> lock(path_mutex());
  path_slot() = path;
}

Decision find_or_measure(uint64_t class_key, int threads,
                         const std::function<Decision()>& measure) {
  const std::string file = path();
  if (file.empty()) return measure();
  const LockedFile locked(file);
  if (locked.fd < 0) {
    warn_once(file, "open or lock");
    return measure();
  }
  std::string text;
  Decision d;
  // A file that cannot be read is measured around, not trusted.
  if (locked.read_all(text) && find_line(text, class_key, threads, d)) return d;
  // Measured while holding the lock: another process after the same class
  // waits and then reads this decision instead of timing its own.
  d = measure();
  if (!locked.append(line_of(class_key, d))) warn_once(file, "append to");
  return d;
}

}  // namespace decision_file
}  // namespace cpu_gemm
}  // namespace handgrad
