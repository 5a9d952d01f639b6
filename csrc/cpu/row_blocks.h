// row_blocks.h — how many row blocks the norms' weight-gradient reductions use (the op files
// size the workspace with it; the kernels reduce over the blocks in order).
#pragma once

#include <algorithm>
#include <cstdint>

namespace slmfast::cpu {

// A function of the row count only, so that results do not depend on the number of threads.
// At most 64 blocks of >= 128 rows.
inline int64_t weight_grad_row_blocks(int64_t rows) {
  const int64_t per_block = std::max<int64_t>(128, (rows + 63) / 64);
  return std::max<int64_t>(1, (rows + per_block - 1) / per_block);
}

}  // namespace slmfast::cpu
