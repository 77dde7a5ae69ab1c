"""report.md of an evaluation: the numbers of report.json (mmdit/evaluate.py) as sentences and tables."""
from __future__ import annotations

from mmdit import edit_eval, geneval
from mmdit.data.shapes import ATTRIBUTES


def markdown(report: dict) -> str:
    p = report["protocol"]
    lines = [f"# mmdit evaluation: {p['model']}", "",
             (f"{p['num_samples']} samples, {p['caption_set']['source']}, {p['steps']} {p['sampler']} steps, "
              f"guidance {p['guidance']}, seed {p['seed']}, DiT mode {p['dit_mode']}, {p['processes']} process(es), "
              f"{p['sampling_seconds']} s sampling."), ""]
    if "fid_extractor" in report:
        e = report["fid_extractor"]
        cached = ", statistics from the cache" if e["reference"]["from_cache"] else ""
        lines += [(f"FID features: {e['label']}; resize: {e['resize']}; reference: {e['reference']['n']} images "
                   f"({e['reference']['rows']}){cached}."), ""]
    if "fid" in report:
        lines += ["## FID", "", (f"{report['fid']['label']}: **{report['fid']['samples_vs_reference']:.3f}** "
                                 "(samples vs reference)"), ""]
    if "clip" in report:
        c = report["clip"]
        lines += ["## CLIP score", "", f"{c['label']}. Floor: real images with the next row's caption.", "",
                  "| captions | n | samples | real images (ceiling) | ratio | mismatched captions (floor) |",
                  "|---|---|---|---|---|---|"]
        for name in ("all_captions", "seen", "held_out"):
            if name in c:
                row = c[name]
                ceiling = f"{row['real_ceiling']['clip_score']:.2f}" if "real_ceiling" in row else "-"
                ratio = f"{100 * row['ratio_to_ceiling']:.1f}%" if "ratio_to_ceiling" in row else "-"
                floor = f"{row['mismatched_floor']['clip_score']:.2f}" if "mismatched_floor" in row else "-"
                lines.append(f"| {name} | {row['n']} | {row['samples']['clip_score']:.2f} | {ceiling} | {ratio} | "
                             f"{floor} |")
        lines.append("")
    if "composition" in report:
        comp, keys = report["composition"], [*ATTRIBUTES, "all"]
        lines += ["## Compositional accuracy (shapes judge)", ""]
        if "skipped" in comp:
            lines += [f"Skipped: {comp['skipped']}.", ""]
        else:
            lines += ["| captions | n | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
            lines += [f"| {name} | {row['n']} | " + " | ".join(f"{100 * row[k]:.1f}%" for k in keys) + " |"
                      for name, row in comp.items()]
            lines.append("")
    if "recon" in report:
        r = report["recon"]
        lines += ["## VQ-VAE reconstruction", "",
                  (f"{r['n']} reference images: PSNR {r['psnr_db']:.2f} dB, {r['fid_label']} of reconstructions vs "
                   f"real: {r['fid_recon_vs_reference']:.3f}"), ""]
        if "clip_retrieval_top1" in r:
            top1 = r["clip_retrieval_top1"]
            lines += [f"CLIP image->text top-1 among the distinct captions: real {100 * top1['reference']:.1f}%, "
                      f"reconstructions {100 * top1['recon']:.1f}%", ""]
    lines += edit_eval.markdown(report["edit"]) if "edit" in report else []
    lines += geneval.markdown(report["geneval"]) if "geneval" in report else []
    return "\n".join(lines)
