// Chat prompt formatting. GGUF ships a Jinja template; rather than embed a
// Jinja engine we recognise the template families we support and render them
// natively (as llama.cpp's built-in templates do):
//   ChatML (SmolLM2, Qwen2), Llama 3, Llama 2.
#ifndef PSA_COMPUTE_WORKER_MODEL_CHAT_TEMPLATE_H_
#define PSA_COMPUTE_WORKER_MODEL_CHAT_TEMPLATE_H_

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "compute_worker/model/gguf_file.h"

namespace psa {

struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

class ChatTemplate {
 public:
  enum class Style { kChatMl, kLlama3, kLlama2 };

  // Detects the style from tokenizer.chat_template (ChatML when absent).
  static absl::StatusOr<ChatTemplate> FromGguf(const GgufFile& file);
  static absl::StatusOr<ChatTemplate> FromJinja(std::string_view jinja);

  // Renders the conversation; with add_assistant_prefix the prompt ends
  // where the assistant's reply begins. INVALID_ARGUMENT for unknown roles.
  absl::StatusOr<std::string> Apply(const std::vector<ChatMessage>& messages,
                                    bool add_assistant_prefix) const;

  Style style() const { return style_; }
  // System prompt the template inserts when the conversation has none.
  const std::string& default_system() const { return default_system_; }

 private:
  Style style_ = Style::kChatMl;
  std::string default_system_;
};

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_MODEL_CHAT_TEMPLATE_H_
