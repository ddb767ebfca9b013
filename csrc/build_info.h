// What this build of plait._C contains and what the CPU it runs on supports.
// Plain C++ (no pybind11): bindings.cpp turns BuildInfo into a Python dict.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace plait {

struct BuildInfo {
  std::string version;                      // plait version the module was built as
  std::string compiler;                     // e.g. "g++ 12.2.0"
  std::string cxx_standard;                 // e.g. "c++17"
  bool cuda = false;                        // whether csrc/**/*.cu were compiled in
  std::optional<std::string> cuda_version;  // nvcc version, e.g. "13.0.88"
  std::vector<std::string> cuda_archs;      // GPU targets, e.g. {"sm_80", "sm_90a"}
  std::string simd;                         // best SIMD level of this CPU: "avx512f", "avx2", "scalar"
  bool openmp = false;                      // whether compiled with OpenMP
};

// Compile-time facts plus the CPU's SIMD level, detected at run time.
BuildInfo build_info();

// "avx512f" or "avx2" when the CPU running this process supports them, else "scalar".
std::string cpu_simd_level();

}  // namespace plait
