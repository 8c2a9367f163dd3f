"""GenST: a spot's expression generated from its histology through two aligned discrete latent spaces.

GenST (Wood et al., "GenST: A Generative Cross-Modal Model for Predicting Spatial
Transcriptomics from Histology Images", 2026) learns a VQ-VAE per modality and aligns them:

1. **Expression VQ-VAE** (stage 1): the encoder reads the spot's log-normalised expression of the
   fold's genes (``log1p`` counts per 10,000 of the spot's library, z-scored per gene on the
   training spots) plus its z-scored log library size; a codebook (``VectorQuantize`` or ``FSQ``
   from vector-quantize-pytorch); the decoder maps a code to a negative-binomial mean of every
   gene's **raw** count (gene-wise dispersion), so depth is part of what a code carries: at
   generation time no library size is observed, and the evaluation targets are unnormalised
   ``log1p`` counts (HEST). ``likelihood="mse"`` regresses z-scored ``log1p`` counts instead.
2. **Histology VQ-VAE** (stage 2) over cached patch features ``obsm["X_<encoder>"]`` of any
   registered encoder (z-scored, clipped; ``histology="features"``), or end to end over the patch
   pixels (``histology="pixels"``: a convolutional VQ-VAE on ``patch_um`` patches at ``patch_px``,
   optionally pretrained on reconstruction alone for ``hist_epochs``), reconstructing its input
   (MSE), trained jointly with
3. **alignment**: symmetric InfoNCE between projections of the two quantised latents of the same
   spot, and a cross-modal head predicting the spot's expression code from the histology latent
   (cross-entropy). The expression VQ-VAE is frozen in stage 2, so the code targets do not move.

Generation: histology -> head -> distribution p(k) over expression codes -> the decoder's output
for each code. The point prediction is the mixture mean ``sum_k p_k log1p(mu_k)`` (``obsm[
"genst_pred"]``), its spread the mixture SD (``obsm["genst_sd"]``); :meth:`GenST.sample` draws
codes (temperature, top-k) and optionally counts, seeded. Settings and alignment epochs are
chosen on validation patients inside the training patients (:func:`select_genst`).
"""

from ._config import GenstConfig
from ._data import codebook_stats
from ._model import GenST
from ._modules import AlignModule, ExprVQModule
from ._nets import GenstNet
from ._pixels import genst_patches
from ._select import select_genst

__all__ = ["GenST", "GenstConfig", "GenstNet", "ExprVQModule", "AlignModule", "codebook_stats", "genst_patches", "select_genst"]
