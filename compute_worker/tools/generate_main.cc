// psa-generate: run the default model (or any Llama GGUF) on one prompt from
// the command line, streaming the completion and printing tokens/s.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/flags_main.h"
#include "compute_worker/model/llama_model.h"
#include "compute_worker/runtime/generator.h"
#include "compute_worker/kernels/matmul.h"
#include "compute_worker/attention/sparse_attention.h"
#include "compute_worker/model/model_registry.h"
#include "compute_worker/runtime/retrieval_heads.h"
#include "common/sha256.h"

ABSL_FLAG(std::string, model, "",
          "GGUF model file, or a registered name such as qwen2.5-coder-1.5b "
          "(scripts/fetch_model.sh --list) (required).");
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
ABSL_FLAG(double, repetition_penalty, 1.0,
          "vLLM's repetition penalty, > 0: logits of prompt and generated tokens are divided "
          "by it if positive, multiplied if negative. 1: off; 1.1-1.2 curbs loops.");
ABSL_FLAG(double, frequency_penalty, 0.0,
          "OpenAI's frequency penalty in [-2, 2]: subtracted from a token's logit per time it "
          "was generated. 0: off.");
ABSL_FLAG(double, presence_penalty, 0.0,
          "OpenAI's presence penalty in [-2, 2]: subtracted from the logit of every token "
          "generated so far. 0: off.");
ABSL_FLAG(std::string, stop, "", "Comma-separated stop strings.");
ABSL_FLAG(int, threads, 0, "CPU threads (0: all cores).");
ABSL_FLAG(int, ctx, 0, "Context limit in tokens (0: the model's).");
ABSL_FLAG(bool, ignore_eos, false, "Keep generating past end-of-turn tokens.");
ABSL_FLAG(bool, quiet, false, "Print only the completion, no statistics.");
ABSL_FLAG(std::string, retrieval_heads, "registry", psa::kRetrievalHeadsFlagHelp);
ABSL_FLAG(std::string, attention, "psa",
          "Decode attention policy: dense, topk or psa, with options, e.g. psa:eps=0.95 or "
          "topk:k=128 (docs/attention.md; prefill is always dense); options it does not name "
          "come from the model registry's default for the file, as the worker's.");
ABSL_FLAG(std::optional<double>, epsilon, std::nullopt,
          "Shorthand for --attention's eps (psa: attention mass to capture, in (0, 1]), when given.");
ABSL_FLAG(std::optional<int>, min_blocks, std::nullopt,
          "Shorthand for --attention's min_blocks (psa: blocks each head attends before it may "
          "stop), when given.");
ABSL_FLAG(std::optional<int>, top_k_blocks, std::nullopt,
          "Shorthand for --attention's k (topk: KV blocks of 16 tokens attended per step), when "
          "given.");

namespace {

// The sites --retrieval_heads names for the model file with this sha256, as
// the worker marks them.
absl::Status SetRetrievalHeads(const std::string& sha, const psa::LlamaModel& model,
                               psa::LlamaRuntime* runtime) {
  absl::StatusOr<std::vector<bool>> sites =
      psa::ResolveRetrievalHeads(absl::GetFlag(FLAGS_retrieval_heads), sha, model.hparams());
  if (!sites.ok()) return sites.status();
  return runtime->SetRetrievalHeads(*std::move(sites));
}

}  // namespace

int main(int argc, char** argv) {
  psa::ParseFlags(
      argc, argv,
      "Generates a completion with a Llama-family GGUF model on the CPU.\n"
      "  psa-generate --model SmolLM2-135M-Instruct.Q4_1.gguf --prompt 'What is PSA?'");
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
  req.sampling.repetition_penalty = static_cast<float>(absl::GetFlag(FLAGS_repetition_penalty));
  req.sampling.frequency_penalty = static_cast<float>(absl::GetFlag(FLAGS_frequency_penalty));
  req.sampling.presence_penalty = static_cast<float>(absl::GetFlag(FLAGS_presence_penalty));
  req.ignore_eos = absl::GetFlag(FLAGS_ignore_eos);
  if (const std::string stop = absl::GetFlag(FLAGS_stop); !stop.empty()) {
    req.stop_strings = absl::StrSplit(stop, ',', absl::SkipEmpty());
  }
  psa::RuntimeOptions opts;
  opts.threads = absl::GetFlag(FLAGS_threads);
  opts.max_context = absl::GetFlag(FLAGS_ctx);
  // Over the model registry's default for the file, as the worker does.
  absl::StatusOr<std::string> file = psa::ResolveModelPath(absl::GetFlag(FLAGS_model));
  absl::StatusOr<std::string> sha = file.ok() ? psa::Sha256File(*file) : file.status();
  absl::StatusOr<psa::AttentionPolicy> base =
      sha.ok() ? psa::DefaultPolicyFor(*sha) : absl::StatusOr<psa::AttentionPolicy>(sha.status());
  if (!base.ok()) {
    std::cerr << "error: " << base.status().message() << "\n";
    return 2;
  }
  absl::StatusOr<psa::AttentionPolicy> parsed =
      psa::AttentionPolicy::Parse(absl::GetFlag(FLAGS_attention), *base);
  if (!parsed.ok()) {
    std::cerr << "error: --attention " << parsed.status().message() << "\n";
    return 2;
  }
  psa::AttentionPolicy policy = *parsed;
  if (auto x = absl::GetFlag(FLAGS_epsilon)) policy.epsilon = static_cast<float>(*x);
  if (auto x = absl::GetFlag(FLAGS_min_blocks)) policy.min_blocks = *x;
  if (auto x = absl::GetFlag(FLAGS_top_k_blocks)) policy.top_k = *x;
  if (auto s = policy.Validate(); !s.ok()) {
    std::cerr << "error: " << s.message() << "\n";
    return 2;
  }
  psa::LlamaRuntime runtime(**model, opts, psa::MakeAttention(policy));
  if (absl::Status s = SetRetrievalHeads(*sha, **model, &runtime); !s.ok()) {
    std::cerr << "error: " << s.message() << "\n";
    return 2;
  }

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
