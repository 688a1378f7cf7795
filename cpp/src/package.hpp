// A v2flow-rt one-call graph compiled by AOTInductor (``v2flow-rt export ... --aoti``): load it, read the I/O
// contract stored in its metadata, convert .npy arrays to tensors and back.
#pragma once

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "io.hpp"

namespace v2flow {

struct TensorSpec {
  std::string name, dtype;            // dtype: "float32" or "int64"
  std::vector<std::string> shape;     // "batch" or a number
};

inline std::vector<TensorSpec> parse_specs(const std::string& text) {
  // "ids:int64:batch,64;orders:int64:batch,64;noise:float32:batch,64,192"
  std::vector<TensorSpec> out;
  std::stringstream items(text);
  std::string item;
  while (std::getline(items, item, ';')) {
    size_t a = item.find(':'), b = item.find(':', a + 1);
    TensorSpec t{item.substr(0, a), item.substr(a + 1, b - a - 1), {}};
    std::stringstream dims(item.substr(b + 1));
    std::string d;
    while (std::getline(dims, d, ',')) t.shape.push_back(d);
    out.push_back(t);
  }
  return out;
}

class Package {
 public:
  explicit Package(const std::string& path) : path_(path), loader_(path) {
    auto meta = loader_.get_metadata();
    if (!meta.count("v2flow.inputs"))
      throw std::runtime_error(path + ": not a v2flow-rt package (no v2flow.inputs metadata); export with --aoti");
    stage_ = meta["v2flow.stage"];
    inputs_ = parse_specs(meta["v2flow.inputs"]);
    outputs_ = parse_specs(meta["v2flow.outputs"]);
    attrs_ = meta["v2flow.attrs"];
    defaults_ = meta["v2flow.defaults"];
  }

  const std::string& stage() const { return stage_; }
  const std::vector<TensorSpec>& inputs() const { return inputs_; }
  const std::vector<TensorSpec>& outputs() const { return outputs_; }
  const std::string& attrs() const { return attrs_; }

  // A number from the JSON attrs / defaults written by v2flow-rt (flat keys only).
  double number(const std::string& key) const {
    for (const std::string* json : {&attrs_, &defaults_}) {
      size_t k = json->find("\"" + key + "\":");
      if (k != std::string::npos) return std::stod(json->substr(k + key.size() + 3));
    }
    throw std::runtime_error(path_ + ": no '" + key + "' in the package metadata");
  }

  // Fixed size of an input's axis (throws for the batch axis).
  int64_t dim(const std::string& input, size_t axis) const {
    for (const auto& t : inputs_)
      if (t.name == input) return std::stoll(t.shape.at(axis));
    throw std::runtime_error(path_ + ": no input '" + input + "'");
  }

  bool has_input(const std::string& name) const {
    for (const auto& t : inputs_)
      if (t.name == name) return true;
    return false;
  }

  // Checks each named array against the contract (dtype, rank, fixed dims, one batch size, values) and runs.
  std::vector<at::Tensor> run(const std::map<std::string, at::Tensor>& feeds) {
    std::vector<at::Tensor> args;
    int64_t batch = -1;
    for (const auto& t : inputs_) {
      auto it = feeds.find(t.name);
      if (it == feeds.end()) throw std::runtime_error(stage_ + ": missing input '" + t.name + "'");
      const at::Tensor& x = it->second;
      auto want = t.dtype == "int64" ? at::kLong : at::kFloat;
      if (x.scalar_type() != want) throw std::runtime_error(stage_ + ": input '" + t.name + "' must be " + t.dtype);
      if (x.dim() != static_cast<int64_t>(t.shape.size()))
        throw std::runtime_error(stage_ + ": input '" + t.name + "' must have " + std::to_string(t.shape.size()) +
                                 " dimensions, got " + std::to_string(x.dim()));
      for (size_t i = 0; i < t.shape.size(); ++i) {
        if (t.shape[i] == "batch") {
          if (batch >= 0 && x.size(i) != batch) throw std::runtime_error(stage_ + ": inputs disagree on the batch size");
          batch = x.size(i);
        } else if (x.size(i) != std::stoll(t.shape[i])) {
          throw std::runtime_error(stage_ + ": input '" + t.name + "' axis " + std::to_string(i) + " must be " +
                                   t.shape[i] + ", got " + std::to_string(x.size(i)));
        }
      }
      check_values(t.name, x);
      args.push_back(x.contiguous());
    }
    return loader_.run(args);
  }

  // The values the contract allows (README, "I/O contract"). Inside the compiled graph an id or an order
  // entry out of range is an out-of-bounds index, which aborts the whole process from a worker thread
  // rather than throwing, and a repeated order entry or a NaN gives a wrong image without a word.
  void check_values(const std::string& name, const at::Tensor& x) const {
    if (x.numel() == 0) return;
    if (name == "ids") {
      const int64_t k = static_cast<int64_t>(number("codebook_size"));
      const int64_t lo = x.min().item<int64_t>(), hi = x.max().item<int64_t>();
      if (lo < 0 || hi >= k)
        throw std::runtime_error(stage_ + ": ids must be in [0, " + std::to_string(k) + "), got range [" +
                                 std::to_string(lo) + ", " + std::to_string(hi) + "]");
    } else if (name == "orders") {
      const int64_t n = x.size(1);
      at::Tensor ok = std::get<0>(x.sort(1)).eq(torch::arange(n, at::kLong)).all(1);   // [B]: a permutation
      const int64_t bad = ok.numel() - ok.sum().item<int64_t>();
      if (bad)
        throw std::runtime_error(stage_ + ": orders row " + std::to_string(ok.logical_not().nonzero()[0][0].item<int64_t>()) +
                                 " is not a permutation of 0.." + std::to_string(n - 1) + " (each position exactly once); " +
                                 std::to_string(bad) + " of " + std::to_string(ok.numel()) + " rows are not");
    } else if (x.is_floating_point()) {
      if (!torch::isfinite(x).all().item<bool>())
        throw std::runtime_error(stage_ + ": input '" + name + "' must be finite");
      if (name == "images") {
        const float top = x.abs().max().item<float>();
        if (top > 1.0f + 1e-4f)
          throw std::runtime_error(stage_ + ": images must be within [-1, 1] (pixel / 127.5 - 1), got |x| up to " +
                                   std::to_string(top));
      }
    }
  }

 private:
  std::string path_, stage_, attrs_, defaults_;
  torch::inductor::AOTIModelPackageLoader loader_;
  std::vector<TensorSpec> inputs_, outputs_;
};

inline at::Tensor to_tensor(const Array& a) {
  auto type = a.dtype == "f4" ? at::kFloat : a.dtype == "i8" ? at::kLong : at::kByte;
  return torch::from_blob(const_cast<char*>(a.data.data()), a.shape, torch::TensorOptions().dtype(type)).clone();
}

inline Array from_tensor(const at::Tensor& t) {
  at::Tensor c = t.contiguous().cpu();
  Array a;
  a.dtype = c.scalar_type() == at::kFloat ? "f4" : c.scalar_type() == at::kLong ? "i8" : "u1";
  a.shape.assign(c.sizes().begin(), c.sizes().end());
  a.data.resize(static_cast<size_t>(c.numel()) * c.element_size());
  std::memcpy(a.data.data(), c.data_ptr(), a.data.size());
  return a;
}

}  // namespace v2flow
