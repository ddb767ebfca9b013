// The Python module plait._C: the only file that uses pybind11. Everything it exposes is
// implemented in plain C++/CUDA files and takes plain values (no torch types), so one
// build serves every torch version.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "build_info.h"
#include "cuda/cuda_api.h"
#include "cuda/ipc_api.h"
#include "cuda/symmetric_api.h"
#include "shm/errors.h"
#include "shm/group.h"
#include "shm/reduce.h"

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

namespace shm = plait::shm;
using shm::Group;

void* ptr(std::uintptr_t address) { return reinterpret_cast<void*>(address); }

shm::Options shm_options(std::size_t slot_bytes, std::size_t chan_bytes, std::size_t oneshot_bytes,
                         const std::string& simd, int spin_us, bool move) {
  shm::Options options;
  options.slot_bytes = slot_bytes;
  options.chan_bytes = chan_bytes;
  options.oneshot_bytes = oneshot_bytes;
  options.simd = shm::simd_from_name(simd);
  options.spin_us = spin_us;
  options.move_off_shared_cpu = move;
  return options;
}

// Shared-memory collectives: exceptions, enum codes, the kernel entry point and ShmGroup.
void bind_shm(py::module_& m) {
  static py::exception<shm::Error> error(m, "ShmError", PyExc_RuntimeError);
  static py::exception<shm::Timeout> timeout(m, "ShmTimeout", error.ptr());
  static py::exception<shm::Aborted> aborted(m, "ShmAborted", error.ptr());
  // pybind11 tries translators newest first: the subclasses are caught before Error.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const shm::Timeout& e) {
      py::set_error(timeout, e.what());
    } catch (const shm::Aborted& e) {
      py::set_error(aborted, e.what());
    } catch (const shm::Error& e) {
      py::set_error(error, e.what());
    }
  });

  py::dict dtypes, ops;
  for (int code = 0; code < shm::kNumDTypes; ++code) dtypes[shm::dtype_name(static_cast<shm::DType>(code))] = code;
  for (int code = 0; code < shm::kNumReduceOps; ++code) ops[shm::op_name(static_cast<shm::ReduceOp>(code))] = code;
  m.attr("shm_dtypes") = dtypes;
  m.attr("shm_ops") = ops;
  m.attr("shm_max_ranks") = shm::kMaxRanks;

  m.def("shm_unlink", &shm::Segment::unlink, py::arg("name"),
        "Remove the shared-memory name (e.g. '/plait-...'); one that does not exist is ignored.");

  m.def("shm_simd_levels", [] {
    std::vector<std::string> levels;
    for (shm::Simd s : {shm::Simd::scalar, shm::Simd::avx2, shm::Simd::avx512}) {
      if (shm::simd_supported(s)) levels.emplace_back(shm::simd_name(s));
    }
    return levels;
  }, "SIMD levels this CPU can run the reductions with, best last.");

  m.def("shm_reduce",
        [](const std::string& simd, int dtype, int op, std::uintptr_t out, const std::vector<std::uintptr_t>& srcs,
           std::size_t count, std::uintptr_t out2) {
          std::vector<const void*> sources;
          for (auto s : srcs) sources.push_back(ptr(s));
          shm::reduce(shm::simd_from_name(simd), shm::dtype_from_code(dtype), shm::op_from_code(op),
                      shm::ReduceArgs{ptr(out), out2 ? ptr(out2) : nullptr, sources.data(),
                                      static_cast<int>(sources.size()), count});
        },
        py::arg("simd"), py::arg("dtype"), py::arg("op"), py::arg("out"), py::arg("srcs"), py::arg("count"),
        py::arg("out2") = 0, py::call_guard<py::gil_scoped_release>(),
        "Element-wise reduction of the arrays at addresses `srcs` into `out` (and `out2` when nonzero), "
        "count elements of dtype code `dtype` (see shm_dtypes), op code `op` (shm_ops). For tests and tools.");

  py::class_<Group>(m, "ShmGroup",
                    "A group of processes on one host communicating through one shared-memory segment. "
                    "Pointers are addresses (tensor.data_ptr()); every call releases the GIL and is bounded by "
                    "timeout_s, raising ShmTimeout, ShmAborted (a peer gave up) or ShmError.")
      .def_static("create",
                  [](const std::string& name, int size, std::size_t slot_bytes, std::size_t chan_bytes,
                     std::size_t oneshot_bytes, const std::string& simd, int spin_us, bool move) {
                    return Group::create(name, size,
                                         shm_options(slot_bytes, chan_bytes, oneshot_bytes, simd, spin_us, move));
                  },
                  py::arg("name"), py::arg("size"), py::arg("slot_bytes"), py::arg("chan_bytes"),
                  py::arg("oneshot_bytes"), py::arg("simd") = "auto", py::arg("spin_us") = -1, py::arg("move") = true,
                  py::call_guard<py::gil_scoped_release>(), "Create the segment `name` as group rank 0.")
      .def_static("attach",
                  [](const std::string& name, int rank, int size, const std::string& simd, int spin_us, bool move) {
                    return Group::attach(name, rank, size, shm_options(0, 0, 0, simd, spin_us, move));
                  },
                  py::arg("name"), py::arg("rank"), py::arg("size"), py::arg("simd") = "auto",
                  py::arg("spin_us") = -1, py::arg("move") = true, py::call_guard<py::gil_scoped_release>(),
                  "Attach to the segment `name` created by rank 0; sizes come from its header.")
      .def("all_reduce",
           [](Group& g, std::uintptr_t data, std::size_t count, int dtype, int op, double timeout_s) {
             g.all_reduce(ptr(data), count, shm::dtype_from_code(dtype), shm::op_from_code(op), timeout_s);
           },
           py::arg("data"), py::arg("count"), py::arg("dtype"), py::arg("op"), py::arg("timeout_s"),
           py::call_guard<py::gil_scoped_release>(), "In-place all-reduce of count elements.")
      .def("all_gather",
           [](Group& g, std::uintptr_t in, std::uintptr_t out, std::size_t bytes_per_rank, std::size_t outer,
              double timeout_s) { g.all_gather(ptr(in), ptr(out), bytes_per_rank, outer, timeout_s); },
           py::arg("input"), py::arg("output"), py::arg("bytes_per_rank"), py::arg("outer"), py::arg("timeout_s"),
           py::call_guard<py::gil_scoped_release>(),
           "Gather every rank's input into output viewed as [outer][size][bytes_per_rank/outer].")
      .def("reduce_scatter",
           [](Group& g, std::uintptr_t in, std::uintptr_t out, std::size_t count_per_rank, std::size_t outer,
              int dtype, int op, double timeout_s) {
             g.reduce_scatter(ptr(in), ptr(out), count_per_rank, outer, shm::dtype_from_code(dtype),
                              shm::op_from_code(op), timeout_s);
           },
           py::arg("input"), py::arg("output"), py::arg("count_per_rank"), py::arg("outer"), py::arg("dtype"),
           py::arg("op"), py::arg("timeout_s"), py::call_guard<py::gil_scoped_release>(),
           "Reduce input viewed as [outer][size][inner] and write this rank's block to output.")
      .def("broadcast",
           [](Group& g, std::uintptr_t data, std::size_t bytes, int src, double timeout_s) {
             g.broadcast(ptr(data), bytes, src, timeout_s);
           },
           py::arg("data"), py::arg("bytes"), py::arg("src"), py::arg("timeout_s"),
           py::call_guard<py::gil_scoped_release>(), "Overwrite data on every rank with group rank src's.")
      .def("send",
           [](Group& g, std::uintptr_t data, std::size_t bytes, int dst, double timeout_s) {
             g.send(ptr(data), bytes, dst, timeout_s);
           },
           py::arg("data"), py::arg("bytes"), py::arg("dst"), py::arg("timeout_s"),
           py::call_guard<py::gil_scoped_release>(), "Send bytes to group rank dst (returns once copied out).")
      .def("recv",
           [](Group& g, std::uintptr_t data, std::size_t bytes, int src, double timeout_s) {
             g.recv(ptr(data), bytes, src, timeout_s);
           },
           py::arg("data"), py::arg("bytes"), py::arg("src"), py::arg("timeout_s"),
           py::call_guard<py::gil_scoped_release>(), "Receive bytes from group rank src.")
      .def("barrier", &Group::barrier, py::arg("timeout_s"), py::call_guard<py::gil_scoped_release>())
      .def("unlink", &Group::unlink_name, "Remove the segment's name (idempotent).")
      .def_property_readonly("attached", &Group::attached)
      .def_property_readonly("rank", &Group::rank)
      .def_property_readonly("size", &Group::size)
      .def_property_readonly("name", &Group::name)
      .def_property_readonly("simd", [](const Group& g) { return std::string(shm::simd_name(g.simd())); })
      .def_property_readonly("slot_bytes", [](const Group& g) { return g.layout().slot_bytes; })
      .def_property_readonly("chan_bytes", [](const Group& g) { return g.layout().chan_bytes; })
      .def_property_readonly("oneshot_bytes", &Group::oneshot_bytes)
      .def_property_readonly("spin_budget_us", &Group::spin_budget_us,
                             "Microseconds a collective's wait spins now before it sleeps (learned from recent waits).")
      .def_property_readonly("spin_cap_us", &Group::spin_cap_us, "The most the spin budget may grow to.")
      .def_property_readonly("sleeps", &Group::sleeps, "Waits of this rank that slept on a flag (diagnostics).")
      .def_property_readonly("moves", &Group::moves,
                             "Times this rank moved off a CPU it shared with a peer it waited for (diagnostics).")
      .def_property_readonly("segment_bytes", [](const Group& g) { return g.layout().total; });
}

// SymmetricBuffer: per-rank device memory every peer maps, for fused GEMM + communication.
void bind_symmetric(py::module_& m) {
  using plait::cuda::SymmetricBuffer;
  m.attr("symmetric_flags") = plait::cuda::kSymmetricFlags;
  py::class_<SymmetricBuffer>(m, "SymmetricBuffer",
                              "This rank's flag area and data area, and the mapped ones of its peers (CUDA IPC). "
                              "Operations are enqueued on the given stream; GPU waits are bounded by timeout_s and "
                              "recorded for check().")
      .def(py::init<int, int, int, std::size_t>(), py::arg("rank"), py::arg("size"), py::arg("device"),
           py::arg("data_bytes"))
      .def("handle", [](const SymmetricBuffer& b) { return py::bytes(b.handle()); }, "This rank's IPC handle.")
      .def("open", [](SymmetricBuffer& b, const std::vector<py::bytes>& handles) {
             std::vector<std::string> raw(handles.begin(), handles.end());
             b.open(raw);
           }, py::arg("handles"), "Map every peer's buffer (handles in group rank order).")
      .def("flag_address", &SymmetricBuffer::flag_address, py::arg("rank"), py::arg("index"))
      .def("data_address", &SymmetricBuffer::data_address, py::arg("rank"))
      .def("set_flag", &SymmetricBuffer::set_flag, py::arg("rank"), py::arg("index"), py::arg("value"),
           py::arg("stream"))
      .def("wait_flag", &SymmetricBuffer::wait_flag, py::arg("rank"), py::arg("index"), py::arg("value"),
           py::arg("stream"), py::arg("timeout_s"))
      .def("reduce_rows", &SymmetricBuffer::reduce_rows, py::arg("out"), py::arg("out_stride"), py::arg("dtype"),
           py::arg("row_begin"), py::arg("row_end"), py::arg("cols"), py::arg("rows_per_chunk"),
           py::arg("first_flag"), py::arg("epoch"), py::arg("blocks"), py::arg("stream"), py::arg("timeout_s"),
           py::call_guard<py::gil_scoped_release>())
      .def("check", &SymmetricBuffer::check, "Raise IpcTimeout if a GPU wait timed out since the last check.")
      .def_property_readonly("rank", &SymmetricBuffer::rank)
      .def_property_readonly("size", &SymmetricBuffer::size)
      .def_property_readonly("data_bytes", &SymmetricBuffer::data_bytes);
}

// CUDA IPC communication: IpcGroup and its timeout exception. Addresses and streams are
// integers (tensor.data_ptr(), torch.cuda.Stream.cuda_stream).
void bind_ipc(py::module_& m) {
  using plait::cuda::IpcGroup;
  static py::exception<plait::cuda::IpcTimeout> timeout(m, "IpcTimeout", PyExc_TimeoutError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const plait::cuda::IpcTimeout& e) {
      py::set_error(timeout, e.what());
    }
  });
  m.attr("ipc_max_ranks") = plait::cuda::kIpcMaxRanks;
  m.attr("ipc_user_flags") = plait::cuda::kIpcUserFlags;
  py::class_<IpcGroup>(m, "IpcGroup",
                       "This rank's CUDA IPC buffer and the mapped buffers of its peers. Operations are enqueued on "
                       "the given stream; waits on the GPU are bounded by timeout_s and recorded for check().")
      .def(py::init<int, int, int, std::size_t, std::size_t, std::size_t>(), py::arg("rank"), py::arg("size"),
           py::arg("device"), py::arg("data_bytes"), py::arg("inbox_bytes"), py::arg("oneshot_bytes"))
      .def("handle", [](const IpcGroup& g) { return py::bytes(g.handle()); }, "This rank's IPC handle (bytes).")
      .def("open", [](IpcGroup& g, const std::vector<py::bytes>& handles) {
             std::vector<std::string> raw(handles.begin(), handles.end());
             g.open(raw);
           }, py::arg("handles"), "Map every peer's buffer (handles in group rank order).")
      .def("all_reduce", &IpcGroup::all_reduce, py::arg("data"), py::arg("count"), py::arg("dtype"), py::arg("op"),
           py::arg("stream"), py::arg("timeout_s"), py::call_guard<py::gil_scoped_release>())
      .def("reduce_scatter", &IpcGroup::reduce_scatter, py::arg("input"), py::arg("output"),
           py::arg("count_per_rank"), py::arg("dtype"), py::arg("op"), py::arg("stream"), py::arg("timeout_s"),
           py::call_guard<py::gil_scoped_release>())
      .def("all_gather", &IpcGroup::all_gather, py::arg("input"), py::arg("output"), py::arg("bytes_per_rank"),
           py::arg("stream"), py::arg("timeout_s"), py::call_guard<py::gil_scoped_release>())
      .def("broadcast", &IpcGroup::broadcast, py::arg("data"), py::arg("bytes"), py::arg("src"), py::arg("stream"),
           py::arg("timeout_s"), py::call_guard<py::gil_scoped_release>())
      .def("barrier", &IpcGroup::barrier, py::arg("stream"), py::arg("timeout_s"),
           py::call_guard<py::gil_scoped_release>())
      .def("send", &IpcGroup::send, py::arg("data"), py::arg("bytes"), py::arg("dst"), py::arg("stream"),
           py::arg("timeout_s"), py::call_guard<py::gil_scoped_release>())
      .def("send_done", &IpcGroup::send_done, py::arg("dst"), py::arg("stream"))
      .def("send_stream", &IpcGroup::send_stream, py::arg("dst"), "The side stream sends to dst run on.")
      .def("recv", &IpcGroup::recv, py::arg("data"), py::arg("bytes"), py::arg("src"), py::arg("stream"),
           py::arg("timeout_s"), py::call_guard<py::gil_scoped_release>())
      .def("flag_address", &IpcGroup::flag_address, py::arg("rank"), py::arg("index"))
      .def("set_flag", &IpcGroup::set_flag, py::arg("rank"), py::arg("index"), py::arg("value"), py::arg("stream"))
      .def("wait_flag", &IpcGroup::wait_flag, py::arg("index"), py::arg("value"), py::arg("stream"),
           py::arg("timeout_s"))
      .def("check", &IpcGroup::check, "Raise IpcTimeout if a GPU wait timed out since the last check.")
      .def_property_readonly("rank", &IpcGroup::rank)
      .def_property_readonly("size", &IpcGroup::size)
      .def_property_readonly("device", &IpcGroup::device)
      .def_property_readonly("data_bytes", &IpcGroup::data_bytes)
      .def_property_readonly("inbox_bytes", &IpcGroup::inbox_bytes)
      .def_property_readonly("oneshot_bytes", &IpcGroup::oneshot_bytes);
  bind_symmetric(m);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "plait's compiled extension: build facts, CUDA device queries, shared-memory collectives.";

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

  bind_shm(m);
  bind_ipc(m);
}
