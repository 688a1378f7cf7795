// Command lines of the v2flow-rt C++ clients: `--name value` pairs checked against the options a client
// takes, and the numbers in them, with errors that name the option. C++17 standard library only.
#pragma once

#include <cmath>
#include <cstdint>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace v2flow {

struct Options {
  std::map<std::string, std::string> values;   // --name → value
  std::vector<std::string> positional;         // the other arguments, in order

  bool has(const std::string& name) const { return values.count(name) != 0; }
  const std::string& get(const std::string& name) const { return values.at(name); }
};

// argv[first..]: every `--name` must be one of `known` and be followed by its value; other arguments are
// positional, refused unless `positional` is true.
inline Options parse_options(int argc, char** argv, int first, const std::set<std::string>& known, bool positional) {
  std::string names;
  for (const auto& k : known) names += (names.empty() ? "" : ", ") + k;
  Options o;
  for (int i = first; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--", 0) == 0) {
      if (!known.count(a)) throw std::runtime_error("unknown option '" + a + "' (the options: " + names + ")");
      if (i + 1 >= argc) throw std::runtime_error(a + " needs a value");
      if (o.has(a)) throw std::runtime_error(a + " is given twice");
      o.values[a] = argv[++i];
    } else if (positional) {
      o.positional.push_back(a);
    } else {
      throw std::runtime_error("unexpected argument '" + a + "'");
    }
  }
  return o;
}

// A seed: a non-negative integer that fits 64 bits (std::stoull alone would take "-1" as 2^64 - 1).
inline uint64_t parse_seed(const std::string& option, const std::string& text) {
  if (text.empty() || text.find_first_not_of("0123456789") != std::string::npos)
    throw std::runtime_error(option + " must be a non-negative integer, got '" + text + "'");
  try {
    return std::stoull(text);
  } catch (const std::out_of_range&) {
    throw std::runtime_error(option + " must fit 64 bits, got '" + text + "'");
  }
}

// A finite number, the whole text of it.
inline double parse_finite(const std::string& option, const std::string& text) {
  size_t used = 0;
  double value = 0.0;
  try {
    value = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (text.empty() || used != text.size() || !std::isfinite(value))
    throw std::runtime_error(option + " must be a finite number, got '" + text + "'");
  return value;
}

}  // namespace v2flow
