// HeadState: the online-softmax state of one query head during one sparse
// attention step (SparseAttention), read by the block kernels and the stop
// rule. Plain data, one per head of the task's GQA group; task-local.
#ifndef PSA_COMPUTE_WORKER_ATTENTION_HEAD_STATE_H_
#define PSA_COMPUTE_WORKER_ATTENTION_HEAD_STATE_H_

#include <cmath>
#include <vector>

namespace psa {

// Online-softmax state of one query head.
struct HeadState {
  float m = -INFINITY;          // running max of scores
  double l = 0;                 // exp-sum in the running scale (AS_acc)
  double as_min = INFINITY;     // smallest full-block exp-sum, running scale
  double group_sum = 0;         // exp-sum of the latest iteration's blocks, running scale
  int group_n = 0;              // blocks in the latest iteration
  double seen_sum = 0;          // exp-sum of every candidate block attended, running scale
  double group_w = 0;           // stop weights (see below) of the latest iteration's blocks
  double seen_w = 0;            // ... of every candidate block attended
  std::vector<float> acc;       // sum of exp(s - m) * v
  bool active = true;            // computes on the blocks read
  bool deciding = true;          // has not stopped: its budget still grows
  int blocks = 0;
  int iterations = 0;
  float captured = 1.0f;
};

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_ATTENTION_HEAD_STATE_H_
