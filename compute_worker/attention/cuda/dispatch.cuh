// Run-time (head dim, GQA group) to the kernels' template arguments, and
// the launch macro. Internal to attention/cuda/.
#ifndef PSA_COMPUTE_WORKER_ATTENTION_CUDA_DISPATCH_CUH_
#define PSA_COMPUTE_WORKER_ATTENTION_CUDA_DISPATCH_CUH_

// Launches kernel (a __global__ function or a pointer to one: template
// arguments' commas would split a macro argument) on `stream`. The CPU
// emulation of the GPU tests (tests/gpu/emulation/) defines its own.
#ifndef PSA_LAUNCH
#define PSA_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#endif

namespace psa::cuda {

template <int D, int G>
struct Shape {
  static constexpr int kD = D, kG = G;
};

// Calls f(Shape<head_dim, group>{}) for head dims 64, 128 and groups
// 1-8; false, calling nothing, for other shapes.
template <int D, typename F>
bool WithGroup(int group, F&& f) {
  switch (group) {
    case 1: f(Shape<D, 1>{}); return true;
    case 2: f(Shape<D, 2>{}); return true;
    case 3: f(Shape<D, 3>{}); return true;
    case 4: f(Shape<D, 4>{}); return true;
    case 5: f(Shape<D, 5>{}); return true;
    case 6: f(Shape<D, 6>{}); return true;
    case 7: f(Shape<D, 7>{}); return true;
    case 8: f(Shape<D, 8>{}); return true;
    default: return false;
  }
}

template <typename F>
bool WithShape(int head_dim, int group, F&& f) {
  if (head_dim == 64) return WithGroup<64>(group, f);
  if (head_dim == 128) return WithGroup<128>(group, f);
  return false;
}

}  // namespace psa::cuda

#endif  // PSA_COMPUTE_WORKER_ATTENTION_CUDA_DISPATCH_CUH_
