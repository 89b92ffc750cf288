// Operator registration of the vllm_retro extension (torch.ops.vllm_retro.*) and the
// Python module init that makes `import vllm_retro._C` load it.
//
// Schemas are defined here once; each backend registers its kernels with
// TORCH_LIBRARY_IMPL(vllm_retro, <DispatchKey>, m) (CPU and Meta below; CUDA kernels
// can register from their own translation unit).

#include <Python.h>  // first, as Python requires

#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(vllm_retro, m) {
  m.def(
      "retro_decode_attention(Tensor query, Tensor sink_keys, Tensor sink_values, "
      "Tensor tail_keys, Tensor tail_values, Tensor keys, Tensor values, "
      "Tensor centroids, Tensor value_sums, Tensor key_vars, Tensor sizes, Tensor starts, "
      "int n_ret, int n_est, float scale, Tensor(a!) out, Tensor? k_ret=None, "
      "float error_bound=0., int max_ret=-1, float variance_cap=2., "
      "float bound_margin=-1., Tensor? vc_su=None, Tensor? vc_w=None, "
      "bool error_rank=False) -> Tensor");
  // Stage 1 of the paged GPU decode (ops.h); its CUDA kernel registers from
  // csrc/cuda/paged_score_op.cpp in CUDA builds only (no CPU kernel).
  m.def(
      "paged_score(Tensor query, Tensor fpart, Tensor ipart, Tensor block_table, Tensor ibt, "
      "Tensor seq_lens, Tensor headers, Tensor(a!) logits, Tensor(b!) score_max, "
      "Tensor(c!) score_sum, Tensor(d!) hist, Tensor(e!) ncand, int sink_blocks, "
      "int block_size, int nsplit, float scale, float cap) -> ()");
  // The last stage of the paged GPU decode (ops.h); CUDA kernel from
  // csrc/cuda/paged_attend_op.cpp in CUDA builds only.
  m.def(
      "paged_attend(Tensor query, Tensor kv_cache, Tensor fpart, Tensor block_table, "
      "Tensor ibt, Tensor seq_lens, Tensor headers, Tensor logits, Tensor lists, "
      "Tensor counts, Tensor(a!) part_o, Tensor(b!) part_m, Tensor(c!) part_l, "
      "Tensor(d!) tickets, Tensor(e!) out, int sink_end, int target_programs, "
      "int max_split, int dynamic, float scale) -> ()");
  // Two paths of a captured CUDA graph, one enabled at a time (the GPU backend's dense
  // switch): the kernel, memset and memcpy nodes of the graph being captured on the
  // current stream of `anchor`'s device, and enabling or disabling nodes of an
  // instantiated graph (`exec`, a cudaGraphExec_t) from its next launch on. CUDA
  // kernels only (csrc/cuda/graph_paths_op.cpp).
  m.def("graph_capture_nodes(Tensor anchor) -> int[]");
  m.def("graph_exec_enable(Tensor anchor, int exec, int[] nodes, bool enabled) -> ()");
}

TORCH_LIBRARY_IMPL(vllm_retro, CPU, m) {
  m.impl("retro_decode_attention", &vllm_retro::retro_decode_attention_cpu);
}

TORCH_LIBRARY_IMPL(vllm_retro, Meta, m) {
  m.impl("retro_decode_attention", &vllm_retro::retro_decode_attention_meta);
}

// ------------------------------------------------------------------ module init
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
#define RETRO_CAT_(a, b) a##b
#define RETRO_CAT(a, b) RETRO_CAT_(a, b)
#define RETRO_STR_(a) #a
#define RETRO_STR(a) RETRO_STR_(a)

static PyModuleDef retro_module = {
    PyModuleDef_HEAD_INIT,
    RETRO_STR(TORCH_EXTENSION_NAME),
    "vllm_retro native kernels; loading this module registers torch.ops.vllm_retro.*",
    -1,
    nullptr,
};

PyMODINIT_FUNC RETRO_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  PyObject* mod = PyModule_Create(&retro_module);
  if (mod == nullptr) return nullptr;
#ifdef RETRO_WITH_CUDA
  PyModule_AddIntConstant(mod, "with_cuda", 1);
#else
  PyModule_AddIntConstant(mod, "with_cuda", 0);
#endif
  return mod;
}
