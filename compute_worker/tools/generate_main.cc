// psa-generate: run the default model (or any Llama GGUF) on one prompt from
// the command line, streaming the completion and printing tokens/s.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "compute_worker/model/llama_model.h"
#include "compute_worker/runtime/generator.h"
#include "compute_worker/kernels/matmul.h"
#include "compute_worker/attention/sparse_attention.h"

ABSL_FLAG(std::string, model, "", "Path to a GGUF model file (required).");
ABSL_FLAG(std::string, prompt, "", "Prompt text. Use --prompt_file for long prompts.");
ABSL_FLAG(std::string, prompt_file, "", "Read the prompt from this file ('-' for stdin).");
ABSL_FLAG(bool, chat, true,
          "Wrap the prompt as a user message in the model's chat template. "
          "--nochat sends the text as is.");
ABSL_FLAG(std::string, system, "", "System message (with --chat).");
ABSL_FLAG(int, max_tokens, 128, "Maximum tokens to generate.");
ABSL_FLAG(double, temperature, 0.0, "Sampling temperature; 0 is greedy.");
ABSL_FLAG(int, top_k, 40, "Keep the k most likely tokens (0: all). Ignored when greedy.");
ABSL_FLAG(double, top_p, 0.95, "Nucleus sampling threshold in (0, 1]. Ignored when greedy.");
ABSL_FLAG(uint64_t, seed, 42, "Random seed for sampling.");
ABSL_FLAG(std::string, stop, "", "Comma-separated stop strings.");
ABSL_FLAG(int, threads, 0, "CPU threads (0: all cores).");
ABSL_FLAG(int, ctx, 0, "Context limit in tokens (0: the model's).");
ABSL_FLAG(bool, ignore_eos, false, "Keep generating past end-of-turn tokens.");
ABSL_FLAG(bool, quiet, false, "Print only the completion, no statistics.");
ABSL_FLAG(std::string, attention, "psa",
          "Decode attention: dense, topk or psa (prefill is always dense).");
ABSL_FLAG(double, epsilon, 0.9, "psa: attention mass to capture, in (0, 1].");
ABSL_FLAG(int, min_blocks, 24, "psa: blocks each head attends before it may stop.");
ABSL_FLAG(int, top_k_blocks, 64, "topk: KV blocks (16 tokens each) attended per step.");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Generates a completion with a Llama-family GGUF model on the CPU.\n"
      "  psa-generate --model SmolLM2-135M-Instruct.Q4_1.gguf --prompt 'What is PSA?'");
  absl::ParseCommandLine(argc, argv);
  const std::string path = absl::GetFlag(FLAGS_model);
  if (path.empty()) {
    std::cerr << "error: --model is required (run scripts/fetch_model.sh for the default model)\n";
    return 2;
  }
  std::string text = absl::GetFlag(FLAGS_prompt);
  if (const std::string pf = absl::GetFlag(FLAGS_prompt_file); !pf.empty()) {
    std::stringstream ss;
    if (pf == "-") {
      ss << std::cin.rdbuf();
    } else {
      std::ifstream in(pf, std::ios::binary);
      if (!in) {
        std::cerr << "error: cannot read --prompt_file " << pf << "\n";
        return 2;
      }
      ss << in.rdbuf();
    }
    text = ss.str();
  }
  if (text.empty()) {
    std::cerr << "error: give a prompt with --prompt or --prompt_file\n";
    return 2;
  }

  const bool quiet = absl::GetFlag(FLAGS_quiet);
  auto model = psa::LlamaModel::Load(path);
  if (!model.ok()) {
    std::cerr << "error: " << model.status().message() << "\n";
    return 1;
  }
  if (!quiet) std::cerr << (*model)->Describe() << " [" << psa::MatMulIsa() << "]\n";

  std::string prompt = text;
  if (absl::GetFlag(FLAGS_chat)) {
    std::vector<psa::ChatMessage> messages;
    if (const std::string sys = absl::GetFlag(FLAGS_system); !sys.empty()) {
      messages.push_back({"system", sys});
    }
    messages.push_back({"user", text});
    auto rendered = (*model)->chat_template().Apply(messages, true);
    if (!rendered.ok()) {
      std::cerr << "error: " << rendered.status().message() << "\n";
      return 1;
    }
    prompt = *rendered;
  }
  const psa::Tokenizer& tok = (*model)->tokenizer();
  psa::GenerationRequest req;
  req.prompt = tok.Encode(prompt, tok.add_bos_default(), /*parse_special=*/true);
  req.max_tokens = absl::GetFlag(FLAGS_max_tokens);
  req.sampling.temperature = static_cast<float>(absl::GetFlag(FLAGS_temperature));
  req.sampling.top_k = absl::GetFlag(FLAGS_top_k);
  req.sampling.top_p = static_cast<float>(absl::GetFlag(FLAGS_top_p));
  req.sampling.seed = absl::GetFlag(FLAGS_seed);
  req.ignore_eos = absl::GetFlag(FLAGS_ignore_eos);
  if (const std::string stop = absl::GetFlag(FLAGS_stop); !stop.empty()) {
    req.stop_strings = absl::StrSplit(stop, ',', absl::SkipEmpty());
  }
  psa::RuntimeOptions opts;
  opts.threads = absl::GetFlag(FLAGS_threads);
  opts.max_context = absl::GetFlag(FLAGS_ctx);
  psa::AttentionPolicy policy;
  if (const std::string a = absl::GetFlag(FLAGS_attention); a == "dense") {
    policy.kind = psa::AttentionPolicy::Kind::kDense;
  } else if (a == "topk") {
    policy.kind = psa::AttentionPolicy::Kind::kTopK;
  } else if (a != "psa") {
    std::cerr << "error: --attention must be dense, topk or psa, not '" << a << "'\n";
    return 2;
  }
  policy.epsilon = static_cast<float>(absl::GetFlag(FLAGS_epsilon));
  policy.min_blocks = absl::GetFlag(FLAGS_min_blocks);
  policy.top_k = absl::GetFlag(FLAGS_top_k_blocks);
  if (auto s = policy.Validate(); !s.ok()) {
    std::cerr << "error: " << s.message() << "\n";
    return 2;
  }
  psa::LlamaRuntime runtime(**model, opts, psa::MakeAttention(policy));

  auto result = psa::Generate(runtime, req, [](psa::TokenId, std::string_view piece) {
    std::fwrite(piece.data(), 1, piece.size(), stdout);
    std::fflush(stdout);
    return true;
  });
  std::printf("\n");
  if (!result.ok()) {
    std::cerr << "error: " << result.status().message() << "\n";
    return 1;
  }
  if (!quiet) {
    const size_t n = result->tokens.size();
    std::fprintf(stderr,
                 "prompt: %zu tokens in %.3f s (%.1f tokens/s); generated: %zu tokens in %.3f s "
                 "(%.1f tokens/s); finish: %s\n",
                 req.prompt.size(), result->prefill_seconds,
                 req.prompt.size() / result->prefill_seconds, n, result->decode_seconds,
                 n > 1 ? (n - 1) / result->decode_seconds : 0.0, result->finish_reason.c_str());
    if (result->kv_blocks_total > 0) {
      std::fprintf(stderr, "attention %s: decode read %.1f%% of the KV blocks dense would read\n",
                   policy.ToString().c_str(),
                   100.0 * result->kv_blocks_touched / result->kv_blocks_total);
    }
  }
  return 0;
}
