"""Report numbers, a one-page PDF and the nuclei CSV (Qt-free, matplotlib).

The numbers are computed once by :func:`report_numbers`; the widget shows them and the
PDF prints them, so the page and the screen cannot disagree.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .imageio import is_tissue


def report_numbers(rgb: np.ndarray, table: dict, mpp: float | None, tissue_probs: dict | None) -> dict:
    """Nucleus count, densities per mm² (whole image and tissue only), size statistics;
    with an unknown µm/px (None) sizes are in px² and there are no densities."""
    n = len(table["index"])
    px_mm2 = (mpp / 1000.0) ** 2 if mpp else None
    tissue_px = int(is_tissue(rgb).sum())
    areas = np.asarray(table["area_um2"] if mpp else table["area_px"], float)
    out = {"nuclei": n, "mpp": mpp, "tissue_class": "not trained", "tissue_probs": tissue_probs,
           "area_unit": "µm²" if mpp else "px²"}
    if tissue_probs:
        out["tissue_class"] = max(tissue_probs, key=tissue_probs.get)
    if px_mm2:
        out["image_area_mm2"] = rgb.shape[0] * rgb.shape[1] * px_mm2
        out["tissue_area_mm2"] = tissue_px * px_mm2
        out["density_per_mm2"] = n / out["image_area_mm2"]
        out["density_per_tissue_mm2"] = n / out["tissue_area_mm2"] if tissue_px else float("nan")
    out["areas"] = areas.tolist()
    if n:
        out.update(area_mean=float(areas.mean()), area_median=float(np.median(areas)), area_sd=float(areas.std()),
                   area_p10=float(np.percentile(areas, 10)), area_p90=float(np.percentile(areas, 90)))
    return out


def overlay(rgb: np.ndarray, labels: np.ndarray, max_side: int = 1200) -> np.ndarray:
    """Thumbnail with nucleus outlines in green."""
    from skimage.segmentation import find_boundaries

    step = max(1, int(np.ceil(max(rgb.shape[:2]) / max_side)))
    thumb = rgb[::step, ::step].copy()
    edges = find_boundaries(labels[::step, ::step], mode="inner")
    thumb[edges] = (0, 230, 0)
    return thumb


def write_nuclei_csv(path: str | Path, table: dict) -> Path:
    path = Path(path)
    cols = list(table)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(cols)
        writer.writerows(zip(*(np.asarray(table[c]).round(4) if np.asarray(table[c]).dtype.kind == "f"
                               else table[c] for c in cols)))
    return path


def write_report(path: str | Path, image_name: str, rgb: np.ndarray, labels: np.ndarray, numbers: dict,
                 settings: dict) -> Path:
    """One A4 page: image with outlines, tissue class, counts, density, sizes, settings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig = plt.figure(figsize=(8.27, 11.69))
    fig.suptitle(f"napari-bach report — {image_name}", fontsize=14, y=0.98)
    ax = fig.add_axes([0.06, 0.42, 0.88, 0.52])
    ax.imshow(overlay(rgb, labels))
    ax.set_axis_off()
    probs = numbers.get("tissue_probs")
    lines = ["Tissue class: " + (f"{numbers['tissue_class']} ({probs[numbers['tissue_class']]:.0%})  —  "
                                 + ", ".join(f"{k} {v:.0%}" for k, v in probs.items()) if probs
                                 else "not trained (the model's tissue head has no tissue training)"),
             f"Nuclei: {numbers['nuclei']}"]
    if numbers.get("mpp"):
        lines.append(f"Density: {numbers['density_per_mm2']:.0f} /mm² of image, "
                     f"{numbers['density_per_tissue_mm2']:.0f} /mm² of tissue "
                     f"(image {numbers['image_area_mm2']:.3f} mm², tissue {numbers['tissue_area_mm2']:.3f} mm², "
                     f"{numbers['mpp']:.4g} µm/px)")
    else:
        lines.append("µm/px unknown: sizes in pixels, no densities (set µm/px in Segment nuclei and re-run)")
    if numbers["nuclei"]:
        lines.append(f"Nucleus area {numbers['area_unit']}: mean {numbers['area_mean']:.1f}, "
                     f"median {numbers['area_median']:.1f}, SD {numbers['area_sd']:.1f}, "
                     f"P10–P90 {numbers['area_p10']:.1f}–{numbers['area_p90']:.1f}")
    lines += [f"{k}: {v}" for k, v in settings.items()]
    fig.text(0.06, 0.39, "\n".join(lines), va="top", fontsize=9.5, family="DejaVu Sans", wrap=True)
    areas = np.asarray(numbers.get("areas", []), float)
    if areas.size:
        hist = fig.add_axes([0.1, 0.06, 0.55, 0.17])
        hist.hist(areas, bins=40, color="#6a5acd")
        hist.set(xlabel=f"nucleus area ({numbers['area_unit']})", ylabel="nuclei")
    keywords = f"nuclei={numbers['nuclei']}; tissue_class={numbers['tissue_class']}"
    if numbers.get("mpp"):
        keywords += f"; density_per_tissue_mm2={numbers['density_per_tissue_mm2']:.0f}"
    fig.savefig(path, metadata={"Title": f"napari-bach report {image_name}", "Keywords": keywords})
    plt.close(fig)
    return path
