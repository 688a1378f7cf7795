// v2flow-detokenize: visual token ids → images with one call of the detokenize package (no Python at run time).
//
//   v2flow-detokenize detokenize.pt2 --ids ids.npy --orders orders.npy --noise noise.npy --out images.npy
//                     [--cfg-scale S] [--ppm PREFIX]
//   v2flow-detokenize detokenize.pt2 --ids ids.npy --seed N --out images.npy [--ppm PREFIX]
//
// orders: int64 [B, N], one permutation of 0..N-1 per row (the tail of each order is decoded first);
// noise: float32 [B, N, C] standard normal, row n the initial noise of the token at position n. The same
// orders and noise as Python's ``sampling.seeded_randomness(seed, B, N, C, num_iter)`` give the same
// images as ``V2FlowPipeline.detokenize(ids, seed=seed)``. --seed draws them here instead (std::mt19937_64:
// a valid random decode, not numpy's stream). --cfg-scale (guided packages; default: the model's).
// Writes float32 [B, 3, S, S] in [-1, 1] and, with --ppm, PREFIX_000.ppm ... (uint8).
#include <algorithm>
#include <cstdio>
#include <iostream>
#include <numeric>
#include <random>

#include "package.hpp"

using namespace v2flow;

int main(int argc, char** argv) {
  try {
    std::map<std::string, std::string> opt;
    for (int i = 2; i + 1 < argc; i += 2) opt[argv[i]] = argv[i + 1];
    if (argc < 2 || !opt.count("--ids") || !opt.count("--out") || (!opt.count("--seed") && !opt.count("--orders"))) {
      std::cerr << "usage: v2flow-detokenize PACKAGE.pt2 --ids IDS.npy (--orders O.npy --noise N.npy | --seed S) "
                   "--out IMAGES.npy [--cfg-scale S] [--ppm PREFIX]\n";
      return 2;
    }
    Package pkg(argv[1]);
    if (pkg.stage() != "detokenize") throw std::runtime_error(std::string(argv[1]) + " is the '" + pkg.stage() + "' package");
    std::map<std::string, at::Tensor> feeds;
    feeds["ids"] = to_tensor(load_npy(opt["--ids"]));
    const int64_t batch = feeds["ids"].size(0), n = pkg.dim("noise", 1), c = pkg.dim("noise", 2);
    if (opt.count("--seed")) {
      std::mt19937_64 rng(std::stoull(opt["--seed"]));
      at::Tensor orders = torch::empty({batch, n}, at::kLong);
      std::vector<int64_t> perm(n);
      for (int64_t b = 0; b < batch; ++b) {
        std::iota(perm.begin(), perm.end(), 0);
        std::shuffle(perm.begin(), perm.end(), rng);
        std::copy(perm.begin(), perm.end(), orders[b].data_ptr<int64_t>());
      }
      at::Tensor noise = torch::empty({batch, n, c});
      std::normal_distribution<float> normal(0.0f, 1.0f);
      float* p = noise.data_ptr<float>();
      for (int64_t i = 0; i < noise.numel(); ++i) p[i] = normal(rng);
      feeds["orders"] = orders;
      feeds["noise"] = noise;
    } else {
      feeds["orders"] = to_tensor(load_npy(opt["--orders"]));
      feeds["noise"] = to_tensor(load_npy(opt.at("--noise")));
    }
    if (pkg.has_input("cfg_scale")) {
      double scale = opt.count("--cfg-scale") ? std::stod(opt["--cfg-scale"]) : pkg.number("cfg_scale");
      feeds["cfg_scale"] = torch::full({1}, scale);
    }
    at::Tensor images = pkg.run(feeds).at(0).clamp(-1.0, 1.0);
    save_npy(opt["--out"], from_tensor(images));
    if (opt.count("--ppm")) {
      at::Tensor u8 = ((images + 1.0) * 127.5).round().clamp(0, 255).to(at::kByte).permute({0, 2, 3, 1}).contiguous();
      for (int64_t b = 0; b < batch; ++b) {
        Image im;
        im.height = u8.size(1);
        im.width = u8.size(2);
        im.rgb.assign(u8[b].data_ptr<uint8_t>(), u8[b].data_ptr<uint8_t>() + u8[b].numel());
        char name[32];
        std::snprintf(name, sizeof(name), "_%03lld.ppm", static_cast<long long>(b));
        save_ppm(opt["--ppm"] + name, im);
      }
    }
    std::cout << "wrote " << opt["--out"] << ": " << batch << " image(s)\n";
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "v2flow-detokenize: error: " << e.what() << "\n";
    return 2;
  }
}
