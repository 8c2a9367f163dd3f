"""``stdistill demo``: the main job on the embedded, *simulated* data, as a sequence of steps.

Each step is a function ``step(run: DemoRun) -> None`` that reads and writes the shared
:class:`DemoRun` (the data, the output folder, the files written). Recipes extend the demo by
adding steps to :data:`STEPS` (before ``"figure"`` when they add obs columns worth drawing, or at
the end); every step is timed and announced, and the closing report lists ``run.outputs``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import typer

from .._keys import Key

DEFAULT_OUT = Path("stdistill_out") / "demo"


@dataclass
class DemoRun:
    """State shared by the demo's steps."""

    out: Path
    seed: int = 0
    n_sections: int = 6
    n_patients: int = 3
    quick: bool = False  #: tiny sizes everywhere (tests); steps shrink their work when set
    patch_px: int = 224  #: patch side in px (112 um patches)
    console: Any = None  #: rich Console
    adata: Any = None  #: AnnData of all sections (obs["niche_true"], ... from datasets.simulated)
    patches: Any = None  #: pp.PatchDataset over adata's spots
    outputs: dict[str, Path] = field(default_factory=dict)  #: label -> file written
    timings: dict[str, float] = field(default_factory=dict)  #: step -> seconds
    info: dict[str, Any] = field(default_factory=dict)  #: free-form results of steps


@dataclass
class Step:
    name: str
    title: str
    func: Callable[[DemoRun], None]


# -- steps ---------------------------------------------------------------------------------------


def step_simulate(run: DemoRun) -> None:
    """Simulated paired ST + H&E sections with known niches (datasets.simulated)."""
    from ..datasets import simulated

    kw = {"spots_per_section": 80, "n_genes": 500} if run.quick else {}
    run.adata = simulated(n_sections=run.n_sections, n_patients=run.n_patients, seed=run.seed, **kw)
    a = run.adata
    run.console.print(
        f"  {a.n_obs} spots x {a.n_vars} genes, {a.obs['section'].nunique()} sections of "
        f"{a.obs['patient'].nunique()} patients (simulated)"
    )


def step_patches(run: DemoRun) -> None:
    """112 um patches centred on every spot, streamed in batches (pp.patches)."""
    import torch

    from ..pp import patches

    ds = patches(run.adata, size_um=112.0, px=run.patch_px)
    n, t0 = 0, time.perf_counter()
    mean_rgb = np.zeros((len(ds), 3), np.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batching is memory-bound; on a busy 2-core box 2 threads made it 10x slower
    try:
        for batch, idx in ds.loader(batch_size=64):
            mean_rgb[idx.numpy()] = batch.float().mean(dim=(2, 3)).numpy()
            n += len(idx)
    finally:
        torch.set_num_threads(threads)
    dt = time.perf_counter() - t0
    run.patches = ds
    run.info["patch_mean_rgb"] = mean_rgb
    run.info["patches_per_s"] = n / max(dt, 1e-9)
    run.console.print(
        f"  {n} patches of 112 um -> {run.patch_px} px ({int(ds.padded.sum())} padded at an image edge), "
        f"{n / max(dt, 1e-9):.0f} patches/s"
    )
    path = run.out / "simulated_patches.png"
    _plot_patches(run, path)
    run.outputs["example patches per niche"] = path


def step_summary(run: DemoRun) -> None:
    """A table of the sections: spots, library sizes, sparsity, image, true niche sizes."""
    from rich import box
    from rich.table import Table

    from ..io import microns_per_pixel, sections

    a = run.adata
    sec = a.obs[Key.obs.section].astype(str).to_numpy()
    lib = np.asarray(a.X.sum(1)).ravel()
    nnz = np.diff(a.X.indptr)
    niches = list(a.obs[Key.obs.niche_true].cat.categories)
    short = {k: "".join(w[0] for w in k.split("_")) if "_" in k else k[:3] for k in niches}
    mpps = sorted({f"{microns_per_pixel(a, s):g}" for s in sections(a)})
    table = Table(title=f"simulated sections: {a.n_vars} genes, images at {'/'.join(mpps)} um/px; "
                  "UMIs = median per spot; spots per true niche on the right",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    for col in ("section", "patient", "spots", "UMIs", "zeros", "image", *short.values()):
        table.add_column(col, justify="left" if col in ("section", "patient") else "right", no_wrap=True)
    for s in sections(a):
        m = sec == s
        w, h = a.uns[Key.uns.spatial][s]["metadata"]["image_size"]
        counts = a.obs.loc[m, Key.obs.niche_true].value_counts()
        table.add_row(
            s,
            str(a.obs.loc[m, "patient"].iloc[0]),
            str(int(m.sum())),
            f"{np.median(lib[m]):.0f}",
            f"{1 - nnz[m].sum() / (m.sum() * a.n_vars):.0%}",
            f"{w}x{h}",
            *(str(int(counts.get(k, 0))) for k in niches),
        )
    run.console.print(table)
    run.console.print("  niches: " + ", ".join(f"{v} = {k}" for k, v in short.items()))


def step_figure(run: DemoRun) -> None:
    """Simulated H&E thumbnails with spots coloured by their true niche."""
    path = run.out / "simulated_niches.png"
    _plot_sections(run.adata, Key.obs.niche_true, path, title="simulated data: true niches")
    run.outputs["H&E with true niches"] = path


ENCODER = "effnet-lite0-imagenet"  # the offline default: an ImageNet model, not a pathology model


def step_features(run: DemoRun) -> None:
    """Patch features with the offline default encoder (features.extract, cached on disk)."""
    from ..features import extract

    key = f"X_{ENCODER}"
    extract(run.adata, encoder=ENCODER, size_um=112.0, px=run.patch_px, key_added=key)
    run.info["feature_key"] = key
    run.console.print(f"  obsm[{key!r}]: {run.adata.obsm[key].shape[1]}-d features of {run.adata.n_obs} patches "
                      f"({ENCODER}: ImageNet weights, not a pathology model)")


def step_niches(run: DemoRun) -> None:
    """Niche distillation, leave one patient out: ST teacher -> H&E student vs histology baselines."""
    from ..recipes import niches

    k = run.adata.obs[Key.obs.niche_true].nunique()
    out = run.out / "niches"
    df, figs = niches.run(run.adata, run.info["feature_key"], n_niches=k, out_dir=out, seed=run.seed,
                          label_key="pathology", verbose=False)
    run.info["niches"] = df
    run.console.print(f"  K = {k} niches; held-out patients; agreement with the ST teacher (simulated data):")
    run.console.print(niches.format_table(df), soft_wrap=True, markup=False)
    run.console.print("  mean over held-out patients:")
    run.console.print(niches.summary(df).round(3).to_string(), soft_wrap=True, markup=False)
    for i, f in enumerate(figs):
        run.outputs[f"niche map {i + 1} (teacher | student | baselines)"] = Path(f)
    run.outputs["niche metrics table"] = out / f"metrics_K{k}.csv"


def step_bundle(run: DemoRun) -> None:
    """Inputs of ``stdistill predict``: a niche student trained on every simulated patient (saved
    as a bundle) and the last section's H&E as a pyramidal TIFF."""
    from .. import io
    from ..bundle import save_bundle
    from ..students import NicheStudent
    from ..teachers import NicheTeacher

    a, k = run.adata, run.adata.obs[Key.obs.niche_true].nunique()
    NicheTeacher(k, seed=run.seed).fit_predict(a, key_added="niche_all")
    s = NicheStudent(feature_key=run.info["feature_key"], size_um=112.0, px=run.patch_px, seed=run.seed,
                     max_epochs=3 if run.quick else 20).fit(a, probs_key="niche_all_probs")
    bundle = save_bundle(s, run.out / "niche_bundle")
    sec = io.sections(a)[-1]
    img = io.image(a, sec)
    slide = io.write_pyramid_tiff(run.out / "simulated_slide.tif", img.read_region(0, 0, *img.size),
                                  io.microns_per_pixel(a, sec))
    run.outputs["niche student bundle (all patients)"] = bundle
    run.outputs["simulated H&E slide (pyramidal TIFF)"] = slide
    run.console.print(f"  next: stdistill predict {slide} --model {bundle} --out {run.out / 'predict'}")


STEPS: list[Step] = [
    Step("simulate", "simulate paired ST + H&E", step_simulate),
    Step("patches", "cut patches at a physical size", step_patches),
    Step("summary", "summarise the sections", step_summary),
    Step("figure", "draw the sections", step_figure),
    Step("features", f"extract patch features ({ENCODER})", step_features),
    Step("niches", "distil ST niches into an H&E-only student", step_niches),
    Step("bundle", "save a student bundle and a slide for stdistill predict", step_bundle),
]


# -- plots ---------------------------------------------------------------------------------------


def _palette(levels) -> dict:
    from ..pl._common import niche_colours

    return dict(zip(levels, niche_colours(len(levels))))


def _plot_sections(adata, key: str, path: Path, title: str = "", thumb_px: int = 500) -> None:
    """One panel per section: its H&E thumbnail with spots coloured by ``obs[key]``; PNG at ``path``."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from .._utils import atomic_path
    from ..io import image, sections

    secs = sections(adata)
    levels = list(adata.obs[key].cat.categories)
    pal = _palette(levels)
    ncol = min(3, len(secs))
    nrow = int(np.ceil(len(secs) / ncol))
    fig = Figure(figsize=(3.6 * ncol, 3.6 * nrow + 0.7))
    axes = fig.subplots(nrow, ncol, squeeze=False)
    sec = adata.obs[Key.obs.section].astype(str).to_numpy()
    for ax in axes.ravel():
        ax.axis("off")
    for ax, s in zip(axes.ravel(), secs):
        thumb, scale = image(adata, s).thumbnail(thumb_px)
        m = sec == s
        xy = np.asarray(adata.obsm[Key.obsm.spatial])[m] * scale
        d = adata.uns[Key.uns.spatial][s]["scalefactors"]["spot_diameter_fullres"] * scale
        ax.imshow(thumb)
        # marker size in points^2 from the spot diameter in thumbnail pixels
        ppd = ax.get_window_extent().width / thumb.shape[1] * 72 / fig.dpi
        ax.scatter(xy[:, 0], xy[:, 1], s=(d * ppd) ** 2, c=[pal[v] for v in adata.obs[key][m]], linewidths=0, alpha=0.8)
        ax.set_title(f"{s} ({adata.obs['patient'][m].iloc[0]})", fontsize=9)
    fig.legend(handles=[Patch(color=pal[v], label=v) for v in levels], loc="lower center", ncol=min(len(levels), 5),
               fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def _plot_patches(run: DemoRun, path: Path, per_niche: int = 6) -> None:
    """Rows = true niches, columns = example patches (the same spots every run for a seed)."""
    from matplotlib.figure import Figure

    from .._utils import atomic_path

    a = run.adata
    levels = list(a.obs[Key.obs.niche_true].cat.categories)
    rng = np.random.default_rng(run.seed)
    fig = Figure(figsize=(1.3 * per_niche, 1.4 * len(levels)))
    axes = fig.subplots(len(levels), per_niche, squeeze=False)
    for r, v in enumerate(levels):
        idx = np.flatnonzero((a.obs[Key.obs.niche_true] == v).to_numpy() & ~run.patches.padded)
        pick = rng.choice(idx, size=min(per_niche, len(idx)), replace=False) if len(idx) else []
        for c in range(per_niche):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(pick):
                ax.imshow(run.patches.read(int(pick[c])))
        axes[r, 0].set_title(v, fontsize=8, loc="left")
    fig.suptitle("simulated 112 um patches by true niche", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


# -- driver --------------------------------------------------------------------------------------


def run_demo(
    out: str | Path = DEFAULT_OUT,
    *,
    seed: int = 0,
    n_sections: int | None = None,
    n_patients: int | None = None,
    quick: bool = False,
    steps: list[Step] | None = None,
    console=None,
) -> DemoRun:
    """Run the demo's steps in order; returns the final :class:`DemoRun`."""
    from rich.console import Console

    from .._errors import StdistillError
    from .._utils import seed_everything

    t_start = time.perf_counter()
    n_sections = n_sections if n_sections is not None else (2 if quick else 6)
    n_patients = n_patients if n_patients is not None else min(3 if not quick else 2, n_sections)
    if n_sections < 1 or not 1 <= n_patients <= n_sections:
        raise StdistillError(f"demo: need 1 <= --n-patients <= --n-sections, got {n_patients} and {n_sections}")
    run = DemoRun(out=Path(out), seed=seed, n_sections=n_sections, n_patients=n_patients, quick=quick,
                  patch_px=64 if quick else 224, console=console or Console())
    run.out.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    steps = STEPS if steps is None else steps
    for k, st in enumerate(steps, 1):
        run.console.rule(f"[bold]{k}/{len(steps)} {st.title}", align="left")
        t0 = time.perf_counter()
        st.func(run)
        run.timings[st.name] = time.perf_counter() - t0
        run.console.print(f"  [dim]{st.name}: {run.timings[st.name]:.1f} s[/dim]")
    run.console.rule("[bold]outputs", align="left")
    for label, path in run.outputs.items():
        run.console.print(f"  {label}: {path}")
    total = time.perf_counter() - t_start
    run.timings["total"] = total
    run.console.print(f"demo finished in {total:.1f} s (all data simulated; outputs in {run.out})")
    return run


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        out: Path = typer.Option(DEFAULT_OUT, "--out", help="Output folder (figures)."),
        seed: int = typer.Option(0, "--seed", help="Random seed (same seed -> same data and numbers)."),
        n_sections: int | None = typer.Option(
            None, "--n-sections", help="Simulated sections (default 6; 2 with --quick)."),
        n_patients: int | None = typer.Option(
            None, "--n-patients", help="Simulated patients (default 3; 2 with --quick)."),
        quick: bool = typer.Option(False, "--quick", hidden=True, help="Tiny sizes, for tests."),
    ) -> None:
        """Run the main job on embedded simulated data: simulate, patch, extract features, distil niches, draw."""
        run_demo(out, seed=seed, n_sections=n_sections, n_patients=n_patients, quick=quick)
