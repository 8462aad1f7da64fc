// A small structure-aware mutator for libFuzzer targets whose input is a
// serialized protobuf message (Debian has no libprotobuf-mutator): parse,
// change one field somewhere in the message tree by reflection (libFuzzer's
// byte mutator on a string, or a boundary value: 0, 1, -1, INT_MAX,
// UINT32_MAX, NaN, inf, a huge string...), re-serialize. Unparsable input
// is replaced by a mutated empty message. Header-only; fuzz targets only.
#ifndef PSA_TESTS_FUZZ_PROTO_MUTATOR_H_
#define PSA_TESTS_FUZZ_PROTO_MUTATOR_H_

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>

#include "google/protobuf/descriptor.h"
#include "google/protobuf/message.h"
#include "google/protobuf/stubs/logging.h"

extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max_size);

namespace psa::fuzz {

using google::protobuf::FieldDescriptor;
using google::protobuf::Message;
using google::protobuf::Reflection;

template <typename T>
T Pick(std::mt19937_64& rng, std::initializer_list<T> values) {
  return *(values.begin() + rng() % values.size());
}

inline int64_t BoundaryInt(std::mt19937_64& rng) {
  switch (rng() % 12) {
    case 0: return 0;
    case 1: return 1;
    case 2: return -1;
    case 3: return std::numeric_limits<int32_t>::max();
    case 4: return std::numeric_limits<int32_t>::min();
    case 5: return std::numeric_limits<uint32_t>::max();
    case 6: return std::numeric_limits<int64_t>::max();
    case 7: return std::numeric_limits<int64_t>::min();
    case 8: return static_cast<int64_t>(rng() % 8);
    case 9: return static_cast<int64_t>(rng() % 300);
    case 10: return static_cast<int64_t>(rng() % 70000);
    default: return static_cast<int64_t>(rng());
  }
}

inline double BoundaryFloat(std::mt19937_64& rng) {
  switch (rng() % 12) {
    case 0: return 0.0;
    case 1: return 1.0;
    case 2: return -1.0;
    case 3: return std::numeric_limits<double>::quiet_NaN();
    case 4: return std::numeric_limits<double>::infinity();
    case 5: return -std::numeric_limits<double>::infinity();
    case 6: return std::numeric_limits<float>::max();
    case 7: return std::numeric_limits<float>::denorm_min();
    case 8: return -0.0;
    case 9: return 2.0;
    case 10: return static_cast<double>(rng() % 1000) / 100.0 - 5.0;
    default: {
      float f;
      uint32_t bits = static_cast<uint32_t>(rng());
      std::memcpy(&f, &bits, sizeof f);
      return f;
    }
  }
}

inline std::string MutateBytes(std::string s, std::mt19937_64& rng, size_t max_size) {
  switch (rng() % 8) {
    case 0: return "";
    case 1: {  // huge (bounded by what libFuzzer lets the input grow to)
      size_t n = max_size > 64 ? rng() % (max_size / 2) : 0;
      return std::string(n, Pick<char>(rng, {'a', ' ', '\0', '\n', '\xff'}));
    }
    case 2: return s + s;
    default: {
      const size_t cap = std::min<size_t>(std::max<size_t>(s.size() * 2 + 16, 64), max_size);
      const size_t len = std::min(s.size(), cap);
      s.resize(cap);
      const size_t n = LLVMFuzzerMutate(reinterpret_cast<uint8_t*>(s.data()), len, cap);
      s.resize(n);
      return s;
    }
  }
}

// proto3 `string` fields must be UTF-8 (a gRPC server refuses to parse
// anything else): invalid sequences become '?', so mutations stay parsable.
inline void FixUtf8(std::string* s) {
  size_t i = 0;
  while (i < s->size()) {
    const unsigned char c = (*s)[i];
    int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    bool ok = n > 0 && i + n <= s->size();
    for (int k = 1; ok && k < n; ++k) ok = ((*s)[i + k] & 0xC0) == 0x80;
    if (ok && n == 2) ok = c >= 0xC2;
    if (ok && n == 3) {
      const unsigned char c1 = (*s)[i + 1];
      ok = !(c == 0xE0 && c1 < 0xA0) && !(c == 0xED && c1 >= 0xA0);
    }
    if (ok && n == 4) {
      const unsigned char c1 = (*s)[i + 1];
      ok = c <= 0xF4 && !(c == 0xF0 && c1 < 0x90) && !(c == 0xF4 && c1 >= 0x90);
    }
    if (!ok) {
      (*s)[i] = '?';
      n = 1;
    }
    i += n;
  }
}

// Silences protobuf's log (e.g. one line per unparsable UTF-8 input).
inline void QuietProtobuf() { google::protobuf::SetLogHandler(nullptr); }

inline void SetScalar(Message* m, const FieldDescriptor* f, int index, std::mt19937_64& rng,
                      size_t max_size) {
  const Reflection* r = m->GetReflection();
  const bool rep = f->is_repeated();
  const int64_t i = BoundaryInt(rng);
  switch (f->cpp_type()) {
#define PSA_SET(CT, T, v) \
  case FieldDescriptor::CPPTYPE_##CT: \
    rep ? r->SetRepeated##T(m, f, index, v) : r->Set##T(m, f, v); \
    break;
    PSA_SET(INT32, Int32, static_cast<int32_t>(i))
    PSA_SET(INT64, Int64, i)
    PSA_SET(UINT32, UInt32, static_cast<uint32_t>(i))
    PSA_SET(UINT64, UInt64, static_cast<uint64_t>(i))
    PSA_SET(DOUBLE, Double, BoundaryFloat(rng))
    PSA_SET(FLOAT, Float, static_cast<float>(BoundaryFloat(rng)))
    PSA_SET(BOOL, Bool, (rng() & 1) != 0)
    PSA_SET(ENUM, EnumValue, static_cast<int>(rng() % 2 ? rng() % 6 : i))
    case FieldDescriptor::CPPTYPE_STRING: {
      std::string s = rep ? r->GetRepeatedString(*m, f, index) : r->GetString(*m, f);
      s = MutateBytes(std::move(s), rng, max_size);
      if (f->type() == FieldDescriptor::TYPE_STRING) FixUtf8(&s);
      rep ? r->SetRepeatedString(m, f, index, s) : r->SetString(m, f, s);
      break;
    }
#undef PSA_SET
    default:
      break;
  }
}

// Changes one field of `m` or of a message below it.
inline void MutateOne(Message* m, std::mt19937_64& rng, size_t max_size, int depth = 0) {
  const auto* d = m->GetDescriptor();
  const Reflection* r = m->GetReflection();
  if (d->field_count() == 0) return;
  const FieldDescriptor* f = d->field(rng() % d->field_count());
  if (f->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE) {
    if (depth > 6) return;
    if (!f->is_repeated()) {
      if (r->HasField(*m, f) && rng() % 8 == 0) {
        r->ClearField(m, f);
      } else {
        MutateOne(r->MutableMessage(m, f), rng, max_size, depth + 1);
      }
      return;
    }
    const int n = r->FieldSize(*m, f);
    switch (n == 0 ? 0 : rng() % 6) {
      case 0: MutateOne(r->AddMessage(m, f), rng, max_size, depth + 1); return;
      case 1: r->RemoveLast(m, f); return;
      case 2: r->AddMessage(m, f)->CopyFrom(r->GetRepeatedMessage(*m, f, rng() % n)); return;
      default:
        MutateOne(r->MutableRepeatedMessage(m, f, rng() % n), rng, max_size, depth + 1);
        return;
    }
  }
  if (!f->is_repeated()) {
    SetScalar(m, f, -1, rng, max_size);
    return;
  }
  const int n = r->FieldSize(*m, f);
  switch (n == 0 ? 0 : rng() % 6) {
    case 0: {  // append one (a few for a repeated number)
      const int k = f->cpp_type() == FieldDescriptor::CPPTYPE_STRING ? 1 : 1 + rng() % 8;
      for (int j = 0; j < k; ++j) {
        switch (f->cpp_type()) {
          case FieldDescriptor::CPPTYPE_UINT32: r->AddUInt32(m, f, 0); break;
          case FieldDescriptor::CPPTYPE_INT32: r->AddInt32(m, f, 0); break;
          case FieldDescriptor::CPPTYPE_UINT64: r->AddUInt64(m, f, 0); break;
          case FieldDescriptor::CPPTYPE_INT64: r->AddInt64(m, f, 0); break;
          case FieldDescriptor::CPPTYPE_STRING: r->AddString(m, f, ""); break;
          case FieldDescriptor::CPPTYPE_BOOL: r->AddBool(m, f, false); break;
          case FieldDescriptor::CPPTYPE_FLOAT: r->AddFloat(m, f, 0); break;
          case FieldDescriptor::CPPTYPE_DOUBLE: r->AddDouble(m, f, 0); break;
          case FieldDescriptor::CPPTYPE_ENUM: r->AddEnumValue(m, f, 0); break;
          default: return;
        }
        SetScalar(m, f, r->FieldSize(*m, f) - 1, rng, max_size);
      }
      return;
    }
    case 1: r->RemoveLast(m, f); return;
    case 2: r->ClearField(m, f); return;
    default: SetScalar(m, f, rng() % n, rng, max_size); return;
  }
}

// The body of LLVMFuzzerCustomMutator for message type M.
template <typename M>
size_t MutateSerialized(uint8_t* data, size_t size, size_t max_size, unsigned int seed) {
  std::mt19937_64 rng(seed);
  M msg;
  if (!msg.ParseFromArray(data, static_cast<int>(size))) msg.Clear();
  const int rounds = 1 + rng() % 3;
  for (int k = 0; k < rounds; ++k) MutateOne(&msg, rng, max_size);
  std::string out;
  if (!msg.SerializeToString(&out) || out.size() > max_size) {
    return LLVMFuzzerMutate(data, size, max_size);  // too big: plain byte mutation
  }
  std::memcpy(data, out.data(), out.size());
  return out.size();
}

}  // namespace psa::fuzz

#endif  // PSA_TESTS_FUZZ_PROTO_MUTATOR_H_
