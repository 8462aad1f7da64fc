#include "compute_worker/model/chat_template.h"

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace psa {

absl::StatusOr<ChatTemplate> ChatTemplate::FromGguf(const GgufFile& file) {
  if (file.Find("tokenizer.chat_template") == nullptr) return FromJinja("");
  auto jinja = file.GetString("tokenizer.chat_template");
  if (!jinja.ok()) return jinja.status();
  return FromJinja(*jinja);
}

absl::StatusOr<ChatTemplate> ChatTemplate::FromJinja(std::string_view jinja) {
  ChatTemplate t;
  if (jinja.empty() || absl::StrContains(absl::string_view(jinja.data(), jinja.size()), "<|im_start|>")) {
    t.style_ = Style::kChatMl;
    // SmolLM2 and Qwen2 templates insert a fixed system turn when the first
    // message is not one, as one string literal:
    // '<|im_start|>system\n...<|im_end|>\n'. The first such literal is it.
    for (size_t at = jinja.find("'<|im_start|>system"); at != std::string_view::npos;
         at = jinja.find("'<|im_start|>system", at + 1)) {
      size_t begin = at + std::string_view("'<|im_start|>system").size();
      if (jinja.substr(begin, 2) == "\\n") {
        begin += 2;  // the Jinja escape
      } else if (jinja.substr(begin, 1) == "\n") {
        begin += 1;
      } else {
        continue;
      }
      const size_t quote = jinja.find('\'', begin);
      const size_t end = jinja.find("<|im_end|>", begin);
      if (end != std::string_view::npos && end < quote) {
        t.default_system_ = std::string(jinja.substr(begin, end - begin));
        break;
      }
    }
  } else if (absl::StrContains(absl::string_view(jinja.data(), jinja.size()), "<|start_header_id|>")) {
    t.style_ = Style::kLlama3;
  } else if (absl::StrContains(absl::string_view(jinja.data(), jinja.size()), "[INST]")) {
    t.style_ = Style::kLlama2;
  } else {
    return absl::InvalidArgumentError(
        "the model's chat template is not one of the supported families "
        "(ChatML, Llama 3, Llama 2); send a plain prompt instead");
  }
  return t;
}

absl::StatusOr<std::string> ChatTemplate::Apply(const std::vector<ChatMessage>& messages,
                                                bool add_assistant_prefix) const {
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string& r = messages[i].role;
    if (r != "system" && r != "user" && r != "assistant") {
      return absl::InvalidArgumentError(absl::StrCat(
          "message ", i, " has role '", r, "'; expected system, user or assistant"));
    }
  }
  std::string out;
  switch (style_) {
    case Style::kChatMl:
      if (!default_system_.empty() && (messages.empty() || messages[0].role != "system")) {
        absl::StrAppend(&out, "<|im_start|>system\n", default_system_, "<|im_end|>\n");
      }
      for (const ChatMessage& m : messages) {
        absl::StrAppend(&out, "<|im_start|>", m.role, "\n", m.content, "<|im_end|>\n");
      }
      if (add_assistant_prefix) out += "<|im_start|>assistant\n";
      break;
    case Style::kLlama3:
      out = "<|begin_of_text|>";
      for (const ChatMessage& m : messages) {
        absl::StrAppend(&out, "<|start_header_id|>", m.role, "<|end_header_id|>\n\n", m.content,
                        "<|eot_id|>");
      }
      if (add_assistant_prefix) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
      break;
    case Style::kLlama2: {
      // <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {assistant} </s>
      std::string system;
      bool first_user = true;
      for (const ChatMessage& m : messages) {
        if (m.role == "system") {
          system = m.content;
        } else if (m.role == "user") {
          out += "<s>[INST] ";
          if (first_user && !system.empty()) {
            absl::StrAppend(&out, "<<SYS>>\n", system, "\n<</SYS>>\n\n");
          }
          absl::StrAppend(&out, m.content, " [/INST]");
          first_user = false;
        } else {
          absl::StrAppend(&out, " ", m.content, " </s>");
        }
      }
      break;
    }
  }
  return out;
}

}  // namespace psa
