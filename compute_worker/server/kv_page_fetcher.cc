#include "compute_worker/server/kv_page_fetcher.h"

#include "absl/strings/str_cat.h"

namespace psa {

void KvPageFetcher::FetchPages(const std::string& sequence_id, int layer, int kv_head,
                               std::vector<int> blocks, std::vector<uint16_t*> dsts,
                               std::function<void(absl::Status)> done) {
  std::vector<uint32_t> indices(blocks.begin(), blocks.end());
  const size_t n = blocks.size();
  auto on_answer = [this, n, dsts = std::move(dsts), done](absl::Status status,
                                                          FetchedBlocks got) {
    if (status.ok() && (got.size() != n || got.block_bytes() != page_bytes_)) {
      status = absl::InternalError(absl::StrCat("the KV service answered ", got.size(),
                                                " pages of ", got.block_bytes(),
                                                " bytes; expected ", n, " of ", page_bytes_));
    }
    if (status.ok()) {
      for (size_t k = 0; k < n; ++k) got.CopyTo(k, 1, reinterpret_cast<char*>(dsts[k]));
    }
    done(status);
  };
  absl::Status s = client_->FetchAsync(sequence_id, layer, indices, absl::Now() + timeout_,
                                       std::move(on_answer), kv_head);
  if (!s.ok()) done(s);
}

}  // namespace psa
