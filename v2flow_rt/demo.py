"""``v2flow-rt demo``: the README's main job on the bundled default model.

Export every precision, validate it against PyTorch, benchmark all backends against PyTorch in one run,
reconstruct the held-out photos on the fastest backend, and write a short report with images and a chart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .data import HELDOUT_PHOTOS, fitting_crops, from_model_range, load_photo, save_grid
from .errors import ArtifactError
from .fileio import atomic_write_text
from .manifest import Manifest
from .metrics import grid_baseline, psnr, ssim

PRECISIONS = ("fp32", "fp16", "int8", "int8-qdq")


def _fmt(x: float) -> str:
    return f"{x:.2f}"


def fastest_ort_row(report: dict[str, Any]) -> tuple[str, str, bool | None]:
    """The ONNX Runtime row of a ``bench.run_bench`` report that detokenizes fastest → (its name, its
    precision, ``one_call`` to run it the same way: False for a ``-loop`` row, else None, the pipeline's
    choice). Raises ArtifactError for a report without ONNX Runtime rows."""
    rows = {n: r for n, r in report["results"].items() if r["backend"].startswith("ort-")}
    if not rows:
        raise ArtifactError("the benchmark report has no ONNX Runtime rows to pick the fastest from")
    name = min(rows, key=lambda n: rows[n]["detokenize"]["median_ms"])
    return name, rows[name]["precision"], False if name.endswith("-loop") else None


def run_demo(out: str | Path, model: str = "default", precisions: tuple[str, ...] = PRECISIONS, repeat: int = 5,
             threads: int | None = None, steps: int | None = None, export: str | Path | None = None) -> Path:
    """Run the whole job; returns the path of ``report.md``. ``steps``: ODE steps baked into the graphs
    and used by every decode (default: the model's). ``export``: an existing export folder of this model to
    validate, benchmark and reconstruct with instead of exporting anew (a full-size export takes minutes);
    it must hold every precision asked for."""
    from .bench import plot, run_bench
    from .export import export_model, validate_folder
    from .pipeline import V2FlowPipeline

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if export is None:
        export_dir = out / "export"
        print(f"[1/4] exporting {model} to {export_dir} ({', '.join(precisions)})")
        manifest = export_model(model, export_dir, precisions=precisions, steps=steps)
    else:
        export_dir = Path(export)
        manifest = Manifest.load(export_dir)
        missing = [p for p in precisions if p not in manifest.precisions]
        if missing:
            raise ArtifactError(f"{export_dir}: export lacks precision(s) {missing} asked for by the demo; it "
                                f"holds {list(manifest.precisions)} (pass --precisions, or export them)")
        print(f"[1/4] using the existing export {export_dir} ({', '.join(precisions)})")
    print("[2/4] validating the graphs against PyTorch")
    validation = validate_folder(export_dir)
    print(f"[3/4] benchmarking (median of {repeat})")
    report = run_bench(model, str(export_dir), precisions=precisions, repeat=repeat, threads=threads, steps=steps)
    atomic_write_text(out / "bench.json", json.dumps(report, indent=2))
    plot(report, out / "bench.png")
    fastest, precision, one_call = fastest_ort_row(report)
    print(f"[4/4] reconstructing the held-out photos on {fastest}")
    pipe = V2FlowPipeline.from_pretrained(export_dir, backend="ort", precision=precision, threads=threads)
    cfg = pipe.config
    crops, _ = fitting_crops([load_photo(n) for n in HELDOUT_PHOTOS], cfg.img_size, per_image=8)
    recon = pipe.reconstruct(crops, one_call=one_call, seed=0, steps=steps)
    ref = from_model_range(crops)
    base = from_model_range(grid_baseline(crops, cfg.grid_size))
    rows = [list(part[i:i + 8]) for i in range(0, min(len(ref), 16), 8) for part in (ref, base, recon)]
    save_grid(out / "reconstructions.png", rows, labels=["original", "grid", fastest] * (len(rows) // 3))
    quality = {"psnr": psnr(ref, recon), "ssim": ssim(ref, recon), "grid_baseline_psnr": psnr(ref, base)}
    lines = [
        f"# v2flow-rt demo: {model} ({cfg.name})", "",
        f"Exported precisions: {', '.join(manifest.precisions)}; validation: {validation.summary()}", "",
        f"Held-out photos ({', '.join(HELDOUT_PHOTOS)}), {len(crops)} crops, reconstructed on **{fastest}**: "
        f"PSNR {_fmt(quality['psnr'])} dB, SSIM {quality['ssim']:.3f}; grid baseline PSNR "
        f"{_fmt(quality['grid_baseline_psnr'])} dB.", "",
        "![reconstructions](reconstructions.png)", "",
        f"## Speed (batch {report['batch']}, median of {repeat}, baseline {report['baseline']})", "",
        "| backend | detokenize ms | speed-up | tokenize ms | speed-up | PSNR vs baseline |",
        "|---|---|---|---|---|---|",
    ]
    psnr_key = "psnr_vs_" + report["baseline"]
    for name, r in report["results"].items():
        lines.append(f"| {name} | {r['detokenize']['median_ms']:.1f} | {r['detokenize_speedup']:.2f}× | "
                     f"{r['tokenize']['median_ms']:.2f} | {r['tokenize_speedup']:.2f}× | {r[psnr_key]:.1f} dB |")
    peak = report["matmul_peak"]["peak_gflops"]
    lines += ["", f"Matrix-multiply peak measured here: {peak:.1f} GFLOP/s.", "", "![speed](bench.png)", "",
              "Manifest quality figures (per precision):", "", "```",
              json.dumps(manifest.quality, indent=1), "```", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


