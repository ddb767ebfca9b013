// The Python module plait._C: the only file that uses pybind11. Everything it exposes is
// implemented in plain C++/CUDA files and takes plain values (no torch types), so one
// build serves every torch version.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "build_info.h"
#include "cuda/cuda_api.h"

namespace py = pybind11;

namespace {

py::dict build_info_dict() {
  const plait::BuildInfo info = plait::build_info();
  py::dict d;
  d["version"] = info.version;
  d["compiler"] = info.compiler;
  d["cxx_standard"] = info.cxx_standard;
  d["cuda"] = info.cuda;
  d["cuda_version"] = info.cuda_version ? py::object(py::str(*info.cuda_version)) : py::object(py::none());
  d["cuda_archs"] = py::cast(info.cuda_archs);
  d["simd"] = info.simd;
  d["openmp"] = info.openmp;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "plait's compiled extension: build facts, CUDA device queries and (later) kernels.";

  m.def("build_info", &build_info_dict,
        "Dict describing this build: version, compiler, cxx_standard, cuda, cuda_version, "
        "cuda_archs, simd (detected on this CPU at run time) and openmp.");

  m.def("cuda_runtime_version", &plait::cuda::runtime_version,
        "CUDA runtime version linked in, encoded as 1000*major + 10*minor (13000 for 13.0).");
  m.def("cuda_driver_version", &plait::cuda::driver_version,
        "Latest CUDA version the driver supports, encoded like cuda_runtime_version; 0 without a driver.");
  m.def("cuda_device_count", &plait::cuda::device_count,
        "Number of usable CUDA devices; 0 without a driver or device (never raises).");
  m.def("cuda_device_name", &plait::cuda::device_name, py::arg("device"), "Name of a CUDA device.");
  m.def("cuda_can_access_peer", &plait::cuda::can_access_peer, py::arg("device"), py::arg("peer"),
        "Whether `device` can access memory on `peer` directly (P2P).");
  m.def("cuda_fill_check", &plait::cuda::fill_check, py::arg("n"), py::call_guard<py::gil_scoped_release>(),
        "Smoke test: write i*3 into n device ints with a kernel, copy back, return whether all match.");
}
