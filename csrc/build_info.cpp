// Build facts come from macros that setup.py defines: PLAIT_VERSION always, and
// PLAIT_WITH_CUDA, PLAIT_CUDA_VERSION, PLAIT_CUDA_ARCHS ("sm_80,sm_90a") when nvcc compiled
// the CUDA sources.
#include "build_info.h"

#include <sstream>

#ifndef PLAIT_VERSION
#error "PLAIT_VERSION must be defined; build plait._C through setup.py"
#endif

namespace plait {
namespace {

std::string compiler_name() {
#if defined(__clang__)
  return "clang++ " + std::to_string(__clang_major__) + "." + std::to_string(__clang_minor__) + "." +
         std::to_string(__clang_patchlevel__);
#elif defined(__GNUC__)
  return "g++ " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "." +
         std::to_string(__GNUC_PATCHLEVEL__);
#else
  return "unknown";
#endif
}

std::string cxx_standard() {
#if __cplusplus >= 202302L
  return "c++23";
#elif __cplusplus >= 202002L
  return "c++20";
#elif __cplusplus >= 201703L
  return "c++17";
#else
  return "c++14";
#endif
}

#ifdef PLAIT_WITH_CUDA
std::vector<std::string> split_commas(const std::string& text) {
  std::vector<std::string> parts;
  std::stringstream stream(text);
  for (std::string part; std::getline(stream, part, ',');) {
    if (!part.empty()) parts.push_back(part);
  }
  return parts;
}
#endif

}  // namespace

std::string cpu_simd_level() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return "avx512f";
  if (__builtin_cpu_supports("avx2")) return "avx2";
#endif
  return "scalar";
}

BuildInfo build_info() {
  BuildInfo info;
  info.version = PLAIT_VERSION;
  info.compiler = compiler_name();
  info.cxx_standard = cxx_standard();
#ifdef PLAIT_WITH_CUDA
  info.cuda = true;
  info.cuda_version = PLAIT_CUDA_VERSION;
  info.cuda_archs = split_commas(PLAIT_CUDA_ARCHS);
#endif
  info.simd = cpu_simd_level();
#ifdef _OPENMP
  info.openmp = true;
#endif
  return info;
}

}  // namespace plait
