// Minimal JSON reader and writer helpers for the TBSM reference client.
// Enough for manifest.json, golden.json and event histories: objects, arrays, strings (with \uXXXX
// escapes), integers kept exactly as int64, doubles, true/false/null. Not a general-purpose library.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace tbsm::json {

class Value {
 public:
  enum class Type { Null, Bool, Int, Double, String, Array, Object };

  Type type = Type::Null;
  bool boolean = false;
  int64_t integer = 0;
  double number = 0.0;
  std::string string;
  std::vector<std::string> keys;  // objects: keys[i] names values[i]
  std::vector<Value> values;      // arrays and objects

  bool is_object() const { return type == Type::Object; }
  bool is_array() const { return type == Type::Array; }
  // The member named `key`, or nullptr.
  const Value* find(std::string_view key) const;
  // The member named `key`; throws std::runtime_error naming `key` when absent.
  const Value& at(std::string_view key) const;
  int64_t as_int() const;      // throws unless an integer (or a double holding one)
  double as_double() const;    // throws unless a number
  const std::string& as_string() const;
  const std::vector<Value>& as_array() const;
};

// Parses a whole document; throws std::runtime_error with the byte offset on malformed input.
Value parse(std::string_view text);

// `s` as a JSON string literal, quotes included.
std::string quote(std::string_view s);

}  // namespace tbsm::json
