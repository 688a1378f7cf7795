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

#include "options.hpp"
#include "package.hpp"

using namespace v2flow;

int main(int argc, char** argv) {
  try {
    if (argc < 2) {
      std::cerr << "usage: v2flow-detokenize PACKAGE.pt2 --ids IDS.npy (--orders O.npy --noise N.npy | --seed S) "
                   "--out IMAGES.npy [--cfg-scale S] [--ppm PREFIX]\n";
      return 2;
    }
    const Options opt = parse_options(argc, argv, 2, {"--ids", "--orders", "--noise", "--seed", "--out",
                                                      "--cfg-scale", "--ppm"}, false);
    if (!opt.has("--ids") || !opt.has("--out")) throw std::runtime_error("give --ids IDS.npy and --out IMAGES.npy");
    if (opt.has("--seed") == (opt.has("--orders") || opt.has("--noise")))
      throw std::runtime_error("give either --seed S or --orders O.npy with --noise N.npy");
    if (opt.has("--orders") != opt.has("--noise"))
      throw std::runtime_error("--orders and --noise go together (or give --seed S)");
    Package pkg(argv[1]);
    if (pkg.stage() != "detokenize") throw std::runtime_error(std::string(argv[1]) + " is the '" + pkg.stage() + "' package");
    std::map<std::string, at::Tensor> feeds;
    feeds["ids"] = to_tensor(load_npy(opt.get("--ids")));
    const int64_t batch = feeds["ids"].size(0), n = pkg.dim("noise", 1), c = pkg.dim("noise", 2);
    if (opt.has("--seed")) {
      std::mt19937_64 rng(parse_seed("--seed", opt.get("--seed")));
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
      feeds["orders"] = to_tensor(load_npy(opt.get("--orders")));
      feeds["noise"] = to_tensor(load_npy(opt.get("--noise")));
    }
    if (pkg.has_input("cfg_scale")) {
      double scale = opt.has("--cfg-scale") ? parse_finite("--cfg-scale", opt.get("--cfg-scale")) : pkg.number("cfg_scale");
      feeds["cfg_scale"] = torch::full({1}, scale);
    } else if (opt.has("--cfg-scale")) {
      throw std::runtime_error("--cfg-scale: " + std::string(argv[1]) + " is an unguided package (exported with cfg 1), "
                               "it takes no guidance scale");
    }
    at::Tensor images = pkg.run(feeds).at(0).clamp(-1.0, 1.0);
    save_npy(opt.get("--out"), from_tensor(images));
    if (opt.has("--ppm")) {
      at::Tensor u8 = ((images + 1.0) * 127.5).round().clamp(0, 255).to(at::kByte).permute({0, 2, 3, 1}).contiguous();
      for (int64_t b = 0; b < batch; ++b) {
        Image im;
        im.height = u8.size(1);
        im.width = u8.size(2);
        im.rgb.assign(u8[b].data_ptr<uint8_t>(), u8[b].data_ptr<uint8_t>() + u8[b].numel());
        char name[32];
        std::snprintf(name, sizeof(name), "_%03lld.ppm", static_cast<long long>(b));
        save_ppm(opt.get("--ppm") + name, im);
      }
    }
    std::cout << "wrote " << opt.get("--out") << ": " << batch << " image(s)\n";
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "v2flow-detokenize: error: " << e.what() << "\n";
    return 2;
  }
}
