// Element conversions between dtypes, without LibTorch: the float conversions `convert`
// applies and the widening to double that `diff` compares with. Bit-for-bit the results
// of LibTorch's Tensor::to (c10's Half and BFloat16 round to nearest even).
#include <cmath>
#include <cstring>
#include <string>

#include "tensormap/dtype.h"
#include "tensormap/error.h"

namespace tensormap {
namespace {

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
  if (exponent == 0x1F) return float_of(sign | 0x7F800000 | (mantissa << 13));  // inf, NaN
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float v = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -v : v;
  }
  return float_of(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

uint16_t float_to_half(float f) {
  const uint32_t x = bits_of(f);
  const auto sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  const uint32_t magnitude = x & 0x7FFFFFFF;
  if (magnitude > 0x7F800000) return sign | 0x7E00;   // NaN
  if (magnitude >= 0x477FF000) return sign | 0x7C00;  // >= 65520 rounds to infinity
  if (magnitude < 0x38800000) {                       // below 2^-14: a subnormal half
    // Scaling by 2^24 is exact; nearbyint rounds to nearest even (the default mode).
    const float scaled = float_of(magnitude) * 16777216.0f;
    return sign | static_cast<uint16_t>(std::nearbyint(scaled));  // 1024 is the least normal, right
  }
  uint32_t h = ((magnitude >> 23) - 112) << 10 | ((magnitude >> 13) & 0x3FF);
  const uint32_t rest = magnitude & 0x1FFF;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) ++h;  // a carry moves into the exponent
  return sign | static_cast<uint16_t>(h);
}

float bf16_to_float(uint16_t b) { return float_of(static_cast<uint32_t>(b) << 16); }

uint16_t float_to_bf16(float f) {
  const uint32_t x = bits_of(f);
  if (std::isnan(f)) return 0x7FC0;
  return static_cast<uint16_t>((x + 0x7FFF + ((x >> 16) & 1)) >> 16);
}

// float8_e4m3fn: bias 7, no infinity, S.1111.111 is NaN.
double e4m3_to_double(uint8_t v) {
  const bool negative = v & 0x80;
  const unsigned exponent = (v >> 3) & 0xF, mantissa = v & 0x7;
  double out;
  if (exponent == 0xF && mantissa == 0x7) return std::nan("");
  if (exponent == 0)
    out = std::ldexp(static_cast<double>(mantissa), -9);
  else
    out = std::ldexp(1.0 + mantissa / 8.0, static_cast<int>(exponent) - 7);
  return negative ? -out : out;
}

// float8_e5m2: the top byte of an F16.
double e5m2_to_double(uint8_t v) { return half_to_float(static_cast<uint16_t>(v << 8)); }

template <typename T>
T load(const unsigned char* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

double element_to_f64(Dtype dtype, const unsigned char* p) {
  switch (dtype) {
    case Dtype::BOOL: return *p ? 1.0 : 0.0;
    case Dtype::U8: return *p;
    case Dtype::I8: return static_cast<int8_t>(*p);
    case Dtype::I16: return load<int16_t>(p);
    case Dtype::U16: return load<uint16_t>(p);
    case Dtype::I32: return load<int32_t>(p);
    case Dtype::U32: return load<uint32_t>(p);
    case Dtype::I64: return static_cast<double>(load<int64_t>(p));
    case Dtype::U64: return static_cast<double>(load<uint64_t>(p));
    case Dtype::F16: return half_to_float(load<uint16_t>(p));
    case Dtype::BF16: return bf16_to_float(load<uint16_t>(p));
    case Dtype::F32: return load<float>(p);
    case Dtype::F64: return load<double>(p);
    case Dtype::F8_E4M3: return e4m3_to_double(*p);
    case Dtype::F8_E5M2: return e5m2_to_double(*p);
    default: return std::nan("");
  }
}

}  // namespace

void convert_floats(Dtype from, const void* src, Dtype to, void* dest, uint64_t count) {
  if (!is_floating_point(from) || !is_floating_point(to)) {
    throw Error(ErrorKind::InvalidArgument, "convert_floats: " + std::string(dtype_name(from)) + " to " +
                                                std::string(dtype_name(to)) + " is not a float conversion");
  }
  const auto* in = static_cast<const unsigned char*>(src);
  auto* out = static_cast<unsigned char*>(dest);
  const size_t in_size = dtype_size(from), out_size = dtype_size(to);
  for (uint64_t i = 0; i < count; ++i, in += in_size, out += out_size) {
    if (from == Dtype::F64 && to == Dtype::F64) {
      std::memcpy(out, in, 8);
      continue;
    }
    // Every value of F16, BF16 and F32 is exact in float; F64 rounds to float first, as
    // c10's Half(float) and BFloat16(float) constructors receive it.
    const float value = from == Dtype::F16    ? half_to_float(load<uint16_t>(in))
                        : from == Dtype::BF16 ? bf16_to_float(load<uint16_t>(in))
                        : from == Dtype::F32  ? load<float>(in)
                                              : static_cast<float>(load<double>(in));
    switch (to) {
      case Dtype::F16: {
        const uint16_t h = float_to_half(value);
        std::memcpy(out, &h, 2);
        break;
      }
      case Dtype::BF16: {
        const uint16_t b = float_to_bf16(value);
        std::memcpy(out, &b, 2);
        break;
      }
      case Dtype::F32: std::memcpy(out, &value, 4); break;
      default: {  // F64: exact from F16, BF16, F32
        const double d = value;
        std::memcpy(out, &d, 8);
      }
    }
  }
}

bool to_f64(Dtype from, const void* src, double* dest, uint64_t count) {
  if (from == Dtype::C64 || from == Dtype::C128) return false;
  const auto* in = static_cast<const unsigned char*>(src);
  const size_t size = dtype_size(from);
  for (uint64_t i = 0; i < count; ++i) dest[i] = element_to_f64(from, in + i * size);
  return true;
}

}  // namespace tensormap
